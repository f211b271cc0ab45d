import subprocess
import sys

from .conftest import ROOT


def test_generated_code_is_fresh():
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_proto.py"), "--check"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
