"""README.md and docs/*.md checked against the code, so that the documentation cannot drift.

Every check is a function from the documents (``{relative path: text}``) to a list of problems, so
the same function runs on the committed files (the tests below) and on a copy with one mistake
planted (``test_a_planted_mismatch_is_caught``), which proves that the check bites:

- command lines (code blocks and inline code starting with ``python``, ``.venv/bin/python``,
  ``deepspeed``, ``torchrun``, ``sbatch``, ``bash slurm/``/``bash bench/``, ``make``, ``d2v2scale-*``,
  after any ``VAR=value``): the module, script, console script or make target exists, and every
  ``--flag`` is one the tool's own argparse parser accepts. The parsers are captured in one worker
  process (``python tests/test_docs.py --parsers IN OUT``) that runs each tool with ``parse_args``
  patched to hand back the parser instead of parsing, so nothing is executed past argument parsing;
- ``section.key=value`` overrides and ``section.key`` references name keys of the schema;
- repository paths exist; links and their anchors resolve;
- the sbatch examples pass under ``DRY_RUN=1``;
- "installs N commands" matches setup.py, and the README names every console script;
- docs/cluster.md names every knob of slurm/common.sh's header, and a stated default run
  directory is common.sh's;
- every shipped DeepSpeed JSON is named in docs/configuration.md; the exit-code tables, the keys a
  resume may change and the module layout match the code; docs/configuration-keys.md is exactly
  what ``python -m d2v2scale.config_reference`` writes.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

TOOLS = ("python", "python3", ".venv/bin/python", "deepspeed", "torchrun", "sbatch", "make")
SECTIONS = ("model", "decoder", "masking", "teacher", "data", "train", "parallel", "profiling")
FILE_SUFFIXES = {"py", "json", "jsonl", "yaml", "yml", "md", "sh", "txt", "tsv", "png", "pt", "npz", "npy", "sbatch"}
REPO_DIRS = ("ds_configs", "slurm", "d2v2scale", "bench", "tests", "launchers", "docs")
NUMBERS = {w: i for i, w in enumerate("zero one two three four five six seven eight nine ten eleven twelve "
                                      "thirteen fourteen fifteen sixteen seventeen eighteen nineteen twenty".split())}
ENV_PASSED = ("NCCL_",)  # environment variables an sbatch example may set besides common.sh's knobs


# ----------------------------------------------------------------------------------- reading
def read_docs(root: Path = ROOT) -> dict[str, str]:
    """README.md and docs/*.md, by path relative to the repository root."""
    docs = {"README.md": (root / "README.md").read_text()}
    for path in sorted((root / "docs").glob("*.md")):
        docs[f"docs/{path.name}"] = path.read_text()
    return docs


@dataclass
class Parsed:
    code: list[tuple[int, str, str]] = field(default_factory=list)  # (line, language, text) of code-block lines
    prose: list[tuple[int, str]] = field(default_factory=list)  # (line, text) outside code blocks


def parse_markdown(text: str) -> Parsed:
    out, lang, inside = Parsed(), "", False
    for n, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            inside = not inside
            lang = line.strip()[3:].strip() if inside else ""
            continue
        (out.code.append((n, lang, line)) if inside else out.prose.append((n, line)))
    return out


def inline_code(line: str) -> list[str]:
    return re.findall(r"`([^`\n]+)`", line)


def headings(text: str) -> list[tuple[int, str]]:
    """(level, text) of the headings outside code blocks."""
    return [(len(m.group(1)), m.group(2).strip()) for _, line in parse_markdown(text).prose
            if (m := re.match(r"^(#{1,6})\s+(.*)$", line))]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = heading.strip().lower().replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(text: str) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for _, h in headings(text):
        s = slug(h)
        out.add(s if s not in seen else f"{s}-{seen[s]}")
        seen[s] = seen.get(s, 0) + 1
    return out


def section(text: str, title: str) -> str:
    """The text under the heading ``title`` up to the next heading of the same or a higher level."""
    lines, out, level = text.splitlines(), [], None
    inside_code = False
    for line in lines:
        if line.lstrip().startswith("```"):
            inside_code = not inside_code
        m = None if inside_code else re.match(r"^(#{1,6})\s+(.*)$", line)
        if m and level is not None and len(m.group(1)) <= level:
            break
        if level is not None:
            out.append(line)
        if m and m.group(2).strip() == title:
            level = len(m.group(1))
    return "\n".join(out)


def first_table(text: str) -> list[list[str]]:
    """The rows (cells) of the first markdown table in ``text``, header and rule excluded."""
    rows, started = [], False
    for line in text.splitlines():
        if line.startswith("|"):
            started = True
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
            if all(re.fullmatch(r":?-+:?", c) for c in cells):
                continue
            rows.append(cells)
        elif started:
            break
    return rows[1:]


# ----------------------------------------------------------------------------------- the code
@lru_cache(maxsize=None)
def console_scripts() -> dict[str, str]:
    """name → module:function, from setup.py's console_scripts."""
    text = (ROOT / "setup.py").read_text()
    block = re.search(r'"console_scripts"\s*:\s*\[(.*?)\]', text, re.S).group(1)
    return dict(re.findall(r'"\s*([\w-]+)\s*=\s*([\w.]+:\w+)\s*"', block))


@lru_cache(maxsize=None)
def make_targets() -> set[str]:
    return set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M))


@lru_cache(maxsize=None)
def knobs() -> tuple[str, ...]:
    """Every variable named in the Knobs list at the top of slurm/common.sh."""
    names = []
    inside = False
    for line in (ROOT / "slurm" / "common.sh").read_text().splitlines():
        if line.startswith("# Knobs"):
            inside = True
            continue
        if inside and not line.startswith("#"):
            break
        m = re.match(r"^#   ([A-Z][A-Z0-9_]*(?:,\s*[A-Z][A-Z0-9_]*)*)\s", line) if inside else None
        if m:
            names += [n.strip() for n in m.group(1).split(",")]
    return tuple(names)


@lru_cache(maxsize=None)
def default_run_dirs() -> set[str]:
    """The default RUN_DIR of slurm/common.sh, as a template and as each sbatch script makes it."""
    common = (ROOT / "slurm" / "common.sh").read_text()
    m = re.search(r'^RUN_DIR="\$\{RUN_DIR:-runs/\$\{SLURM_JOB_NAME:-(.*?)\}\}"$', common, re.M)
    assert m, "slurm/common.sh's RUN_DIR default has a new form: update default_run_dirs()"
    fallback = m.group(1)  # e.g. d2v2-${PRESET}
    out = {"runs/<job name>", "runs/$SLURM_JOB_NAME"}
    for script in (ROOT / "slurm").glob("*.sbatch"):
        text = script.read_text()
        job = re.search(r"^#SBATCH --job-name=(\S+)", text, re.M)
        preset = re.search(r'^export PRESET="\$\{PRESET:-(\w+)\}"', text, re.M)
        if job:
            out.add(f"runs/{job.group(1)}")
        if preset:
            out.add("runs/" + fallback.replace("${PRESET}", preset.group(1)))
    return out


@lru_cache(maxsize=None)
def schema_keys() -> frozenset[str]:
    from d2v2scale.config_reference import key_names

    return frozenset(key_names())


def sbatch_nodes(script: str) -> str:
    m = re.search(r"^#SBATCH --nodes=(\d+)", (ROOT / script).read_text(), re.M)
    return m.group(1) if m else "1"


# ----------------------------------------------------------------------------------- commands
@dataclass
class Command:
    doc: str
    line: int
    text: str
    env: dict[str, str]
    argv: list[str]

    def where(self) -> str:
        return f"{self.doc}:{self.line}: `{self.text}`"


def parse_command(doc: str, line: int, text: str) -> Command | None:
    text = re.sub(r"\s+#.*$", "", text.strip())  # a trailing comment
    text = re.sub(r"^\$\s+", "", text)
    try:
        tokens = shlex.split(text)
    except ValueError:
        tokens = text.split()
    env = {}
    while tokens and re.match(r"^[A-Z_][A-Z0-9_]*=", tokens[0]):
        name, _, value = tokens.pop(0).partition("=")
        env[name] = value
    if not tokens:
        return None
    first = tokens[0]
    if len(tokens) == 1 and not env and (first in TOOLS or is_placeholder(first)):
        return None  # a tool named in prose (`sbatch`, `d2v2scale-*`), not a command line
    if first in TOOLS or first.startswith("d2v2scale-") or \
            (first == "bash" and len(tokens) > 1 and tokens[1].startswith(("slurm/", "bench/"))):
        return Command(doc, line, text, env, tokens)
    return None


def commands(docs: dict[str, str]) -> list[Command]:
    out = []
    for doc, text in docs.items():
        parsed = parse_markdown(text)
        pending, start = "", 0
        for n, lang, line in parsed.code:
            if lang not in ("", "sh", "bash", "shell", "console"):
                continue
            if pending:
                pending += " " + line.strip()
            else:
                pending, start = line.strip(), n
            if pending.endswith("\\"):
                pending = pending[:-1]
                continue
            cmd = parse_command(doc, start, pending)
            if cmd:
                out.append(cmd)
            pending = ""
        for n, line in parsed.prose:
            for span in inline_code(line):
                cmd = parse_command(doc, n, span)
                if cmd:
                    out.append(cmd)
    return out


def is_placeholder(token: str) -> bool:
    return bool(re.search(r"[<>|{}*]|\.\.\.", token)) or bool(re.search(r"(^|[/.])[A-Z][A-Z_]*(\.[a-z]+)?$", token))


def flag_name(token: str) -> str | None:
    t = token.strip("[](),")
    m = re.fullmatch(r"(--?[A-Za-z][\w-]*)(=.*)?", t)
    return m.group(1) if m else None


@dataclass
class Invocation:
    """One tool a command runs, with the arguments its parser sees."""

    kind: str  # module | script | entry | deepspeed | torchrun
    target: str
    argv: list[str]
    check_flags: bool = True


def invocations(cmd: Command) -> tuple[list[Invocation], list[str]]:
    """The tools a command runs, and the problems found on the way (missing module, file, target)."""
    a, problems, out = cmd.argv, [], []
    first = a[0]

    def script_or_module(rest: list[str]) -> None:
        if not rest:
            return
        if rest[0] == "-m" and len(rest) > 1:
            module = rest[1]
            if is_placeholder(module):
                return
            if not module_exists(module):
                problems.append(f"{cmd.where()}: module {module} does not exist")
                return
            out.append(Invocation("module", module, rest[2:], check_flags=module.startswith("d2v2scale")))
        elif rest[0].endswith(".py") and not is_placeholder(rest[0]):
            if not (ROOT / rest[0]).is_file():
                problems.append(f"{cmd.where()}: {rest[0]} does not exist")
                return
            out.append(Invocation("script", rest[0], rest[1:]))

    if first in ("python", "python3", ".venv/bin/python"):
        script_or_module(a[1:])
    elif first.startswith("d2v2scale-"):
        entry = console_scripts().get(first)
        if entry is None:
            problems.append(f"{cmd.where()}: {first} is not a console script in setup.py "
                            f"({', '.join(console_scripts())})")
        else:
            out.append(Invocation("entry", entry, a[1:]))
    elif first in ("deepspeed", "torchrun"):
        split = next((i for i, t in enumerate(a) if i > 0 and (t.endswith(".py") or t == "-m")), len(a))
        out.append(Invocation(first, first, a[1:split]))
        script_or_module(a[split:])
    elif first == "make":
        for target in a[1:]:
            if "=" not in target and target not in make_targets():
                problems.append(f"{cmd.where()}: make has no target {target!r}")
    elif first in ("sbatch", "bash"):
        script = next((t for t in a[1:] if t.startswith(("slurm/", "bench/"))), None)
        if script is None and not any(is_placeholder(t) for t in a):
            problems.append(f"{cmd.where()}: no script named")
        elif script is not None and not is_placeholder(script) and not (ROOT / script).is_file():
            problems.append(f"{cmd.where()}: {script} does not exist")
        if script and script.startswith("slurm/"):
            allowed = set(knobs())
            for name in cmd.env:
                if name not in allowed and not name.startswith(ENV_PASSED):
                    problems.append(f"{cmd.where()}: {name} is not a knob of slurm/common.sh ({', '.join(knobs())})")
    return out, problems


@lru_cache(maxsize=None)
def module_exists(name: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


_PARSERS: dict[tuple, dict] = {}


def parsers(requests: list[Invocation]) -> None:
    """Capture the argument parser of each tool (cached), in one worker process."""
    todo = []
    for inv in requests:
        key = (inv.kind, inv.target, tuple(inv.argv))
        if key not in _PARSERS and key not in [tuple(t[:2]) + (tuple(t[2]),) for t in todo]:
            todo.append([inv.kind, inv.target, inv.argv])
    if not todo:
        return
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "in.json", Path(tmp) / "out.json"
        src.write_text(json.dumps(todo))
        env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT)}
        proc = subprocess.run([sys.executable, str(Path(__file__)), "--parsers", str(src), str(dst)], cwd=ROOT,
                              env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0 and dst.exists(), f"parser worker failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}"
        for (kind, target, argv), result in zip(todo, json.loads(dst.read_text())):
            _PARSERS[(kind, target, tuple(argv))] = result


def flag_problems(cmd: Command, inv: Invocation) -> list[str]:
    result = _PARSERS[(inv.kind, inv.target, tuple(inv.argv))]
    flags = [f for f in map(flag_name, inv.argv) if f]
    if "error" in result:
        return [f"{cmd.where()}: could not read the options of {inv.target}: {result['error']}"]
    options = set(result["options"][""])
    sub = next((t for t in inv.argv if not t.startswith("-") and t in result["options"]), None)
    if sub:
        options |= set(result["options"][sub])
    received = {flag_name(t) for t in result["received"]}
    return [f"{cmd.where()}: {inv.target} has no option {f} (it has: {', '.join(sorted(options))})"
            for f in flags if f not in options and f in received]


OVERRIDE = re.compile(r"^([a-z_][a-z0-9_]*)(?:\.([a-z_][a-z0-9_]*))?=")


def override_problems(where: str, tokens: list[str]) -> list[str]:
    out = []
    for token in tokens:
        t = token.strip("[](),")
        m = OVERRIDE.match(t)
        if not m or t in ("key=value", "section.key=value") or t.startswith("section."):
            continue
        name = f"{m.group(1)}.{m.group(2)}" if m.group(2) else m.group(1)
        if m.group(2) is None and m.group(1) not in schema_keys():
            out.append(f"{where}: {t}: '{m.group(1)}' is not a top-level key")
        elif m.group(2) is not None and name not in schema_keys():
            out.append(f"{where}: {t}: {name} is not a configuration key")
    return out


def check_commands(docs: dict[str, str]) -> list[str]:
    """Tools exist, every --flag parses, every override names a key, knobs are knobs."""
    problems, pairs = [], []
    for cmd in commands(docs):
        invs, found = invocations(cmd)
        problems += found
        tokens = cmd.argv + [t for name, value in cmd.env.items() if name == "EXTRA" for t in value.split()]
        problems += override_problems(cmd.where(), tokens)
        pairs += [(cmd, inv) for inv in invs if inv.check_flags and any(flag_name(t) for t in inv.argv)]
    parsers([inv for _, inv in pairs])
    for cmd, inv in pairs:
        problems += flag_problems(cmd, inv)
    return problems


# ----------------------------------------------------------------------------------- references
KEY_REF = re.compile(r"(?<![\w./$-])(" + "|".join(SECTIONS) + r")\.([A-Za-z_][A-Za-z0-9_]*)")
REPO_PATH = re.compile(r"(?<![\w./~$-])((?:" + "|".join(REPO_DIRS) + r")/[\w./*<>{}-]*)")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def code_texts(text: str) -> list[tuple[int, str]]:
    """(line, text) of every code-block line and every inline code span."""
    parsed = parse_markdown(text)
    return [(n, line) for n, _, line in parsed.code] + \
        [(n, span) for n, line in parsed.prose for span in inline_code(line)]


def check_key_references(docs: dict[str, str]) -> list[str]:
    """Every `section.key` in code names a key of the schema."""
    problems = []
    for doc, text in docs.items():
        for n, code in code_texts(text):
            for m in KEY_REF.finditer(code):
                key, rest = m.group(2), code[m.end():]
                if key in FILE_SUFFIXES or rest.startswith(("(", ".")):
                    continue
                if f"{m.group(1)}.{key}" not in schema_keys():
                    problems.append(f"{doc}:{n}: {m.group(1)}.{key} is not a configuration key")
    return problems


def check_paths(docs: dict[str, str]) -> list[str]:
    """Repository paths in code exist; so do ds_config names given bare."""
    problems = []
    shipped = {p.name for p in (ROOT / "d2v2scale" / "ds_configs").glob("*.json")}
    for doc, text in docs.items():
        for n, code in code_texts(text):
            for m in REPO_PATH.finditer(code):
                path = m.group(1).rstrip(".,:;")
                if is_placeholder(path) or path.endswith("/..."):
                    continue
                if not (ROOT / path).exists():
                    problems.append(f"{doc}:{n}: {path} does not exist")
            for name in re.findall(r"(?<![\w/.-])((?:vit|audio|text|cpu)_[\w-]*\.json)\b", code):
                if name not in shipped:
                    problems.append(f"{doc}:{n}: {name} is not a shipped DeepSpeed JSON ({', '.join(sorted(shipped))})")
    return problems


def check_links(docs: dict[str, str]) -> list[str]:
    problems = []
    for doc, text in docs.items():
        for n, line in parse_markdown(text).prose:
            for target in LINK.findall(line):
                if re.match(r"^[a-z]+:", target):
                    continue
                file, _, anchor = target.partition("#")
                path = (ROOT / doc).parent / file if file else ROOT / doc
                rel = os.path.relpath(path, ROOT)
                if not path.exists():
                    problems.append(f"{doc}:{n}: link to {target}: {rel} does not exist")
                elif anchor and path.suffix == ".md":
                    text_there = docs.get(rel, None) or path.read_text()
                    if anchor not in anchors(text_there):
                        problems.append(f"{doc}:{n}: link to {target}: {rel} has no heading #{anchor}")
    return problems


def check_command_count(docs: dict[str, str]) -> list[str]:
    """A sentence "installs N commands" says as many as setup.py has; the README names each."""
    problems, count = [], len(console_scripts())
    for doc, text in docs.items():
        for m in re.finditer(r"installs\s+(\w+)\s+(?:console\s+)?commands", text, re.I):
            word = m.group(1).lower()
            said = int(word) if word.isdigit() else NUMBERS.get(word)
            if said is not None and said != count:
                problems.append(f"{doc}: '{m.group(0)}', but setup.py installs {count}: {', '.join(console_scripts())}")
    for name in console_scripts():
        if not re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", docs.get("README.md", "")):
            problems.append(f"README.md does not name the console script {name}")
    return problems


def check_knobs(docs: dict[str, str]) -> list[str]:
    text = docs.get("docs/cluster.md", "")
    return [f"docs/cluster.md does not name the knob {k} of slurm/common.sh" for k in knobs()
            if not re.search(rf"(?<![A-Z0-9_]){k}(?![A-Z0-9_])", text)]


def _units(text: str):
    """Sentences of prose, and table rows (with their header), outside code blocks."""
    parsed = parse_markdown(text)
    paragraph, header = [], ""
    for _, line in parsed.prose + [(0, "")]:
        if line.startswith("|"):
            if not header:
                header = line
            elif not re.fullmatch(r"[|\s:-]+", line):
                yield line, header
            continue
        header = ""
        if line.strip():
            paragraph.append(line)
            continue
        for sentence in re.split(r"(?<=[.;])\s+(?=[A-Z(*`])", " ".join(paragraph)):
            yield sentence, ""
        paragraph = []


def check_default_run_dir(docs: dict[str, str]) -> list[str]:
    """A stated default run directory is slurm/common.sh's (RUN_DIR) or the launcher's (--run_dir)."""
    problems, allowed = [], default_run_dirs()
    stated_in_cluster = False
    for doc, text in docs.items():
        for unit, header in _units(text):
            values = re.findall(r"`(runs/[^`]*)`", unit)
            if not values or "default" not in (unit + header).lower():
                continue
            if "--run_dir" in unit and "RUN_DIR" not in unit:
                ok = {"runs/<preset>"}
            elif "RUN_DIR" in unit or "run directory" in unit.lower():
                ok = allowed
                stated_in_cluster |= doc == "docs/cluster.md"
            else:
                continue
            for v in values:
                if v.rstrip("/") != "runs" and not any(v.rstrip("/") == a or v.startswith(a + "/") for a in ok):
                    problems.append(f"{doc}: stated default run directory `{v}` is not "
                                    f"slurm/common.sh's ({', '.join(sorted(ok))})")
    if not stated_in_cluster:
        problems.append("docs/cluster.md does not state RUN_DIR's default")
    return problems


def check_ds_configs_named(docs: dict[str, str]) -> list[str]:
    text = docs.get("docs/configuration.md", "")
    return [f"docs/configuration.md does not name {p.name}" for p in sorted((ROOT / "d2v2scale" / "ds_configs").glob("*.json"))
            if p.name not in text]


def check_exit_codes(docs: dict[str, str]) -> list[str]:
    from d2v2scale import exit_codes

    codes = {v for k, v in vars(exit_codes).items() if k.startswith("EXIT_")}
    problems = []
    for doc, title in (("docs/failures.md", "Exit codes"), ("docs/troubleshooting.md", "By exit code")):
        rows = first_table(section(docs.get(doc, ""), title))
        listed = {int(r[0]) for r in rows if r and r[0].isdigit()}
        if listed != codes:
            problems.append(f"{doc} '{title}' lists exit codes {sorted(listed)}; d2v2scale/exit_codes.py has {sorted(codes)}")
    return problems


def check_resumable(docs: dict[str, str]) -> list[str]:
    from d2v2scale.config import resumable_keys

    text = docs.get("docs/checkpoints.md", "")
    m = re.search(r"<!-- resumable:begin -->(.*?)<!-- resumable:end -->", text, re.S)
    if not m:
        return ["docs/checkpoints.md has no resumable:begin/end block"]
    listed, keys = set(re.findall(r"`([^`]+)`", m.group(1))), set(resumable_keys())
    if listed != keys:
        return [f"docs/checkpoints.md: keys a resume may change differ from config.resumable_keys(): "
                f"missing {sorted(keys - listed)}, extra {sorted(listed - keys)}"]
    return []


def check_layout(docs: dict[str, str]) -> list[str]:
    """docs/development.md's layout lists exactly the modules and scripts there are."""
    block = section(docs.get("docs/development.md", ""), "Layout")
    m = re.search(r"```\n(.*?)```", block, re.S)
    if not m:
        return ["docs/development.md has no Layout block"]
    listed, stack = set(), []
    for line in m.group(1).splitlines():
        if not line.strip():
            continue
        depth = (len(line) - len(line.lstrip())) // 2
        name = line.split()[0]
        stack[depth:] = [name]
        listed.add("".join(stack).rstrip("/"))
    actual = {str(p.relative_to(ROOT)) for p in (ROOT / "d2v2scale").rglob("*.py") if p.name != "__init__.py"}
    actual |= {str(p.relative_to(ROOT)) for d in ("launchers", "slurm") for p in (ROOT / d).iterdir() if p.is_file()}
    problems = [f"docs/development.md's layout does not list {p}" for p in sorted(actual - listed)]
    problems += [f"docs/development.md's layout lists {p}, which does not exist" for p in sorted(listed)
                 if not (ROOT / p).exists()]
    return problems


STATIC_CHECKS = (check_key_references, check_paths, check_links, check_command_count, check_knobs,
                 check_default_run_dir, check_ds_configs_named, check_exit_codes, check_resumable, check_layout)


# ----------------------------------------------------------------------------------- dry runs
def dry_runs(docs: dict[str, str]) -> list[tuple[str, str, dict[str, str]]]:
    """(where, script, environment) of each distinct sbatch example, as a DRY_RUN."""
    seen, out = set(), []
    for cmd in commands(docs):
        if cmd.argv[0] not in ("sbatch", "bash"):
            continue
        script = next((t for t in cmd.argv[1:] if t.startswith("slurm/") and t.endswith(".sbatch")), None)
        if script is None or not (ROOT / script).is_file():
            continue
        env = {k: v for k, v in cmd.env.items() if not is_placeholder(v) and k != "DRY_RUN"}
        if cmd.argv[0] == "sbatch":
            nodes = next((re.match(r"--nodes=(\d+)", t).group(1) for t in cmd.argv if re.match(r"--nodes=\d+", t)),
                         None)
            env["NODES"] = nodes or sbatch_nodes(script)
        env.pop("RUN_DIR", None)  # a temporary folder instead (the dry run checks that it is writable)
        key = (script, tuple(sorted(env.items())))
        if key not in seen:
            seen.add(key)
            out.append((cmd.where(), script, env))
    return out


def run_dry(script: str, env: dict[str, str], tmp: Path) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in knobs()
            and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    run_dir = Path(tempfile.mkdtemp(dir=tmp))
    full = {**base, **env, "DRY_RUN": "1", "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp),
            "RUN_DIR": str(run_dir / "run")}
    return subprocess.run(["bash", script], cwd=ROOT, env=full, capture_output=True, text=True, timeout=240)


# ----------------------------------------------------------------------------------- the tests
def test_configuration_keys_reference_is_generated_from_the_schema():
    """docs/configuration-keys.md is exactly what the generator writes (a new key fails until regenerated)."""
    from d2v2scale.config_reference import NOTES, key_names, render

    committed = (ROOT / "docs" / "configuration-keys.md").read_text()
    assert committed == render(), ("docs/configuration-keys.md is out of date: regenerate it with "
                                   "python -m d2v2scale.config_reference > docs/configuration-keys.md")
    assert set(NOTES) <= key_names(), f"config_reference.NOTES names keys the schema lacks: {set(NOTES) - key_names()}"


def test_every_configuration_key_is_in_the_reference():
    from d2v2scale import config

    text = (ROOT / "docs" / "configuration-keys.md").read_text()
    cfg = {}
    for preset in ("tiny_image", "tiny_audio", "tiny_text"):  # each modality's own keys (run_dict: no plugin's)
        for sec, value in config.load_config(preset).run_dict().items():
            cfg[sec] = {**cfg.get(sec, {}), **value} if isinstance(value, dict) else value
    for sec, value in cfg.items():
        for key in (value if isinstance(value, dict) else {sec: None}):
            name = f"{sec}.{key}" if isinstance(value, dict) else sec
            assert f"`{name}`" in text, f"{name} is missing from docs/configuration-keys.md"


def test_commands_name_real_tools_flags_and_keys():
    docs = read_docs()
    found = commands(docs)
    assert len(found) > 30, f"only {len(found)} command lines found in the docs: is the extraction broken?"
    problems = check_commands(docs)
    assert not problems, "\n".join(problems)


def test_documentation_matches_the_code():
    docs = read_docs()
    problems = [p for check in STATIC_CHECKS for p in check(docs)]
    assert not problems, "\n".join(problems)


def test_readme_stays_short():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; the details belong in docs/"


def test_sbatch_examples_pass_a_dry_run(tmp_path):
    runs = dry_runs(read_docs())
    assert len(runs) >= 3, runs
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda r: run_dry(r[1], r[2], tmp_path), runs))
    failed = [f"{where} (DRY_RUN=1 {' '.join(f'{k}={v}' for k, v in env.items())} bash {script}): exit "
              f"{p.returncode}\n{(p.stdout + p.stderr)[-1500:]}" for (where, script, env), p in zip(runs, results)
              if p.returncode != 0]
    assert not failed, "\n\n".join(failed)


def _add_command(doc: str, line: str):
    def plant(docs):
        docs[doc] += f"\n```\n{line}\n```\n"
    return plant


def _replace(doc: str, old: str, new: str):
    def plant(docs):
        assert old in docs[doc], f"{old!r} is not in {doc}: update the planted mismatch"
        docs[doc] = docs[doc].replace(old, new)
    return plant


PLANTED = {
    "installs five commands": (
        _replace("README.md", "The package installs these commands;", "The package installs five commands;"),
        check_command_count, "installs five commands"),
    "a ds_config JSON that does not exist": (
        _add_command("docs/cluster.md", "python -m d2v2scale.plan --preset vit_h "
                                        "--ds_config ds_configs/vit_h_a100_80gb.json --nodes 32"),
        check_paths, "vit_h_a100_80gb.json"),
    "a knob list without STAGE_DIR": (
        lambda docs: docs.__setitem__("docs/cluster.md", docs["docs/cluster.md"].replace("STAGE_DIR", "STAGE_FOLDER")),
        check_knobs, "STAGE_DIR"),
    "runs/vit_h-123 as the default run directory": (
        _replace("docs/cluster.md", "| `runs/<job name>` (`runs/d2v2-vit_h`", "| `runs/vit_h-123` (`runs/d2v2-vit_h`"),
        check_default_run_dir, "runs/vit_h-123"),
    "a module that does not exist": (
        _add_command("docs/data.md", "python -m d2v2scale.planner --nodes 32"), check_commands, "d2v2scale.planner"),
    "a module path that does not exist": (
        _replace("docs/configuration.md", "`d2v2scale/train/compile.py`", "`d2v2scale/train/compiler.py`"),
        check_paths, "d2v2scale/train/compiler.py"),
    "a section.key that does not exist": (
        _add_command("docs/configuration.md", "python launchers/pretrain.py --ds_config ds_configs/cpu_tiny.json "
                                              "--preset tiny_image train.max_update=10"),
        check_commands, "train.max_update"),
    "a section.key reference that does not exist": (
        _replace("docs/troubleshooting.md", "`train.hang_timeout_s`", "`train.hang_timeout`"),
        check_key_references, "train.hang_timeout"),
    "a flag that does not parse": (
        _add_command("docs/cluster.md", "python -m d2v2scale.plan --preset vit_h "
                                        "--ds_config ds_configs/vit_h.json --nodez 32"),
        check_commands, "--nodez"),
    "a launcher flag that does not parse": (
        _add_command("docs/configuration.md", "torchrun --nproc-per-gpu 8 launchers/pretrain.py "
                                              "--ds_config ds_configs/vit_h.json --preset vit_h"),
        check_commands, "--nproc-per-gpu"),
    "a link to a heading that does not exist": (
        _replace("README.md", "docs/cluster.md#time-limits-and-how-long-a-run-takes", "docs/cluster.md#time-limits"),
        check_links, "#time-limits"),
}


@pytest.mark.parametrize("name", list(PLANTED))
def test_a_planted_mismatch_is_caught(name):
    """Each check fails on a copy of the documents with one mistake planted in it."""
    plant, check, expected = PLANTED[name]
    docs = read_docs()
    plant(docs)
    problems = check(docs)
    assert any(expected in p for p in problems), f"{name}: not caught; the check said {problems}"


# ----------------------------------------------------------------------------------- the worker
class _Captured(BaseException):
    """Raised by the patched parse methods: the tool reached its parser; nothing past it runs."""


def _capture(kind: str, target: str, argv: list[str]) -> dict:
    import argparse
    import contextlib
    import importlib
    import io
    import runpy

    grabbed: dict = {}
    names = ("parse_args", "parse_known_args", "parse_intermixed_args", "parse_known_intermixed_args")
    originals = {n: getattr(argparse.ArgumentParser, n) for n in names}

    def grab(self, args=None, namespace=None):
        grabbed["parser"], grabbed["args"] = self, list(sys.argv[1:] if args is None else args)
        raise _Captured()

    saved = sys.argv[:], dict(os.environ), sys.path[:]
    error = None
    for n in names:
        setattr(argparse.ArgumentParser, n, grab)
    try:
        sys.argv = [target] + list(argv)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            if kind == "module":
                runpy.run_module(target, run_name="__main__", alter_sys=True)
            elif kind == "script":
                sys.path.insert(0, str((ROOT / target).parent))  # as `python SCRIPT` puts its folder first
                runpy.run_path(str(ROOT / target), run_name="__main__")
            elif kind == "entry":
                module, function = target.split(":")
                getattr(importlib.import_module(module), function)()
            elif kind == "deepspeed":
                from deepspeed.launcher.runner import parse_args
                parse_args(list(argv))
            elif kind == "torchrun":
                from torch.distributed.run import parse_args
                parse_args(list(argv))
    except _Captured:
        pass
    except SystemExit as e:
        error = f"exited ({e.code}) before parsing its arguments"
    except Exception as e:  # noqa: BLE001
        error = f"{type(e).__name__}: {e}"
    finally:
        for n in names:
            setattr(argparse.ArgumentParser, n, originals[n])
        sys.argv, path = saved[0], saved[2]
        os.environ.clear()
        os.environ.update(saved[1])
        sys.path[:] = path
    if "parser" not in grabbed:
        return {"error": error or "no argument parser was reached"}
    parser = grabbed["parser"]
    options = {"": sorted(o for a in parser._actions for o in a.option_strings)}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                options[name] = sorted(o for a in sub._actions for o in a.option_strings)
    return {"options": options, "received": grabbed["args"]}


def _parser_worker(src: str, dst: str) -> None:
    sys.path.insert(0, str(ROOT))
    requests = json.loads(Path(src).read_text())
    Path(dst).write_text(json.dumps([_capture(kind, target, argv) for kind, target, argv in requests]))


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "--parsers":
    _parser_worker(sys.argv[2], sys.argv[3])
