"""Record what the pinned vLLM's command line accepts, for the supervisor's spot check.

`app/lifecycle/engine_flags.json` lists every flag of vLLM's OpenAI server,
the values of the flags with choices, the flags that take JSON and the
registered tool-call parsers, reasoning parsers, quantization methods and
weight formats. The supervisor checks the engine's command line against it in
milliseconds, before any Hub request, without importing vLLM.
`tests/unit/test_flag_check.py` fails when the file no longer matches the
installed vLLM (after a version bump): regenerate it with this tool.

    python tools/engine_flag_facts.py          # rewrite the file
    python tools/engine_flag_facts.py --check  # exit 1 when it is stale
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.lifecycle.flag_check import FACTS_FILE, EngineFacts, engine_parser  # noqa: E402


def current() -> str:
    return EngineFacts.from_engine(engine_parser()).to_json()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when the file does not match the installed vLLM")
    args = parser.parse_args()
    facts = current()
    if args.check:
        if FACTS_FILE.exists() and FACTS_FILE.read_text() == facts:
            return 0
        print(f"{FACTS_FILE.relative_to(ROOT)} is stale: run python tools/engine_flag_facts.py", file=sys.stderr)
        return 1
    FACTS_FILE.write_text(facts)
    print(f"wrote {FACTS_FILE.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
