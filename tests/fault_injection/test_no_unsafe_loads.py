"""The package loads nothing with an unrestricted unpickler: every pickle / torch.load / numpy load in megaseg/ is
weights-only, restricted, or one of the listed in-memory exchanges between megaseg's own processes."""
from __future__ import annotations

import re
from pathlib import Path

import megaseg

PACKAGE = Path(megaseg.__file__).resolve().parent
# file (relative to megaseg/) -> why its pickle use is safe. Only in-memory data from processes megaseg started.
ALLOWED = {
    "parallel/spawn.py": "results and exceptions sent back by the ranks megaseg.parallel.spawn started, over a pipe",
}
UNSAFE = [
    (re.compile(r"\bpickle\.loads?\s*\("), "pickle.load"),
    (re.compile(r"\b(c?pickle|dill|joblib|cloudpickle)\.Unpickler\s*\("), "an unrestricted Unpickler"),
    (re.compile(r"weights_only\s*=\s*False"), "weights_only=False"),
    (re.compile(r"allow_pickle\s*=\s*True"), "allow_pickle=True"),
    (re.compile(r"\b(joblib|dill|shelve|marshal)\.load"), "a pickle-based loader"),
    (re.compile(r"\bdist_checkpointing\.load(_common_state_dict|_tensors_metadata|_sharded_metadata|_plain_tensors)?"
                r"\s*\("), "megatron's loaders (their defaults unpickle .metadata without restriction)"),
    (re.compile(r"(?<!Safe)FileSystemReader\s*\("), "torch's FileSystemReader (plain pickle.load of .metadata)"),
]
TORCH_LOAD = re.compile(r"\btorch\.load\s*\(")


def _calls(text: str, start: int) -> str:
    """The text of the call starting at ``start`` up to its closing parenthesis."""
    depth = 0
    for index in range(text.index("(", start), len(text)):
        depth += {"(": 1, ")": -1}.get(text[index], 0)
        if depth == 0:
            return text[start:index + 1]
    return text[start:]


def test_no_unsafe_pickle_loads_in_the_package():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        name = path.relative_to(PACKAGE).as_posix()
        text = path.read_text()
        for pattern, what in UNSAFE:
            for match in pattern.finditer(text):
                if name in ALLOWED and what in ("pickle.load",):
                    continue
                line = text.count("\n", 0, match.start()) + 1
                found.append(f"megaseg/{name}:{line}: {what}")
        for match in TORCH_LOAD.finditer(text):
            if not re.search(r"weights_only\s*=\s*True", _calls(text, match.start())):
                found.append(f"megaseg/{name}:{text.count(chr(10), 0, match.start()) + 1}: torch.load without "
                             "weights_only=True")
    assert not found, "unsafe loads (route them through megaseg.checkpoint.safe_load):\n" + "\n".join(found)


def test_the_scan_finds_what_it_looks_for(tmp_path):
    # The patterns match the calls they are meant to catch (a scan that matches nothing would pass anyway).
    samples = ["pickle.load(f)", "torch.load(p, weights_only=False)", "np.load(p, allow_pickle=True)",
               "dist_checkpointing.load(sd, d)", "FileSystemReader(d)", "dist_checkpointing.load_common_state_dict(d)"]
    for sample in samples:
        assert any(pattern.search(sample) for pattern, _ in UNSAFE), sample
    assert TORCH_LOAD.search("torch.load(path)") and not re.search(r"weights_only\s*=\s*True",
                                                                    _calls("torch.load(path)", 0))
    assert not any(pattern.search("SafeFileSystemReader(d)") for pattern, _ in UNSAFE)
