"""The proto is the only coupling between the gateway, the engine and the
media workers: none imports another. `vllm_mlx/` holds what they share and
imports none of them, except the modules that run the engine inside the
user's process (the in-process engine, the benchmark), which import the
engine and media code and never the gateway. The chat UI reaches a server
over HTTP only."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SERVICES = ("gateway", "engine_worker", "media_worker")
# Run the engine in the caller's process: they compose the services' code.
IN_PROCESS = ("vllm_mlx/in_process.py", "vllm_mlx/bench/")


def imported_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


def modules(folder: str) -> list[Path]:
    return sorted(p for p in (ROOT / folder).rglob("*.py") if "/v1/" not in str(p))


@pytest.mark.parametrize("service", SERVICES)
def test_a_service_imports_no_other_service(service):
    for path in modules(service):
        for name in imported_packages(path):
            top = name.split(".")[0]
            assert top not in SERVICES or top == service, f"{path.relative_to(ROOT)}: {name}"
            assert not name.startswith(("vllm_mlx.in_process", "vllm_mlx.bench")), \
                f"{path.relative_to(ROOT)} imports a module that runs the engine: {name}"


def test_shared_code_imports_no_service():
    for path in modules("vllm_mlx"):
        rel = str(path.relative_to(ROOT))
        in_process = rel.startswith(IN_PROCESS)
        for name in imported_packages(path):
            top = name.split(".")[0]
            if in_process:
                assert top != "gateway", f"{rel}: {name} (the gateway is reached over HTTP)"
            else:
                assert top not in SERVICES, f"{rel}: {name}"


# The chat UI is a client of any OpenAI-compatible server: HTTP only.
CHAT_UI = "vllm_mlx/chat"
ENGINE_SIDE = ("vllm_mlx.in_process", "vllm_mlx.bench", "vllm_mlx.models", "vllm_mlx.v1", "grpc")


def test_the_chat_ui_reaches_the_server_over_http_only():
    paths = modules(CHAT_UI)
    assert paths, CHAT_UI
    for path in paths:
        for name in imported_packages(path):
            rel = str(path.relative_to(ROOT))
            assert name.split(".")[0] not in SERVICES, f"{rel}: {name}"
            assert not name.startswith(ENGINE_SIDE), f"{rel}: {name} (engine-side code)"
