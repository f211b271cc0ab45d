"""How every command shows its flags: with their defaults, which come from
the settings dataclasses (vllm_mlx/settings.py, gateway/config.py), so each
default is stated once. tests/test_flags.py holds every command to that."""

import argparse


class HelpFormatter(argparse.RawDescriptionHelpFormatter,
                    argparse.ArgumentDefaultsHelpFormatter):
    """The description as written; "(default: X)" after each flag's help."""
