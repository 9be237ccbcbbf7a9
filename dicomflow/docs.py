"""Writes docs/configuration.md from the configuration model: ``python -m dicomflow.docs``."""

from __future__ import annotations

from shared.config import describe

HEADER = """# Configuration reference

Generated from `shared/config.py` by `python -m dicomflow.docs` (also `dicomflow config reference`);
a test fails when this file and the model disagree.

One YAML file (`--config FILE` or `DICOMFLOW_CONFIG`), validated at start-up: an unknown key or a bad
value stops the service with the key and the reason. Environment variables override the file:
`DICOMFLOW__SECTION__KEY=value`, the value parsed as YAML (`DICOMFLOW__INGEST__PORT=104`,
`DICOMFLOW__INGEST__ALLOWED_CALLING_AES='[CT1, MR2]'`), and `DICOMFLOW_DATA_DIR` sets `data_dir`.
Command-line flags (`--data-dir`, `--dicom-port`, `--ae-title`) override both.
`<name>` stands for the key of an entry in a named mapping (a backend, a policy, a target, a group).

"""


def render() -> str:
    """The whole document."""
    lines = [HEADER, "| setting | default | meaning |", "|---|---|---|"]
    for key, default, doc in describe():
        lines.append(f"| `{key}` | `{default}` | {doc.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(render(), end="")
