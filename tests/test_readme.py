"""The README opens with the project's name and its two set-up commands, and CI runs the second."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_readme_opens_with_the_two_setup_commands():
    text = (ROOT / "README.md").read_text()
    assert text.startswith("# normfuse\n")
    head = text[: text.index("\n## ")]  # everything before the first section
    blocks = re.findall(r"```bash\n(.*?)\n```", head, flags=re.S)
    assert len(blocks) == 2, blocks
    install_and_run, tests = blocks
    assert install_and_run.startswith("pip install torch==") and "python -m export.build --norm" in install_and_run
    run_tests = tests.split(" && ")[-1]
    assert run_tests.startswith("python -m pytest")
    ci = (ROOT / ".ci" / "run").read_text()
    assert ci.rstrip().endswith(run_tests)  # CI runs the suite as the README says, workers included
    for step in tests.split(" && ")[:-1]:  # every install step of the test command is one CI makes
        assert step.replace("pip install", "").split()[-1].strip('"') in ci, step
