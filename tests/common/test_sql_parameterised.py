"""No SQL is built from strings in the services: every value reaches PostgreSQL as a bind
parameter ($1, $2...), never spliced into the query text.

The check reads the source with `ast`. A *built* string is an f-string with a placeholder,
`"..." % x`, `"...".format(x)` or a `+` chain with a non-literal operand. It is a finding when
its literal parts contain an SQL keyword (SELECT, INSERT, UPDATE, DELETE, WHERE, VALUES) and it

- is an argument of a database call (execute, executemany, fetch, fetchrow, fetchval,
  copy_*, prepare, cursor), directly or through a variable assigned (or `+=`-extended) in the
  same module, or
- looks like an SQL statement wherever it is (SELECT ... FROM, INSERT INTO, UPDATE ... SET,
  DELETE FROM, WHERE x =), so a query handed around before it is run is caught too.
"""

from __future__ import annotations

import ast
import re
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SERVICES = ROOT / "services"

DB_METHODS = frozenset(
    {"execute", "executemany", "fetch", "fetchrow", "fetchval", "prepare", "cursor"}
)
SQL_KEYWORD = re.compile(r"\b(SELECT|INSERT|UPDATE|DELETE|WHERE|VALUES)\b", re.IGNORECASE)
SQL_STATEMENT = re.compile(
    r"\bSELECT\b[\s\S]*\bFROM\b|\bINSERT\s+INTO\b|\bUPDATE\b[\s\S]*\bSET\b"
    r"|\bDELETE\s+FROM\b|\bWHERE\s+\w+\s*(=|<|>|IN\b|LIKE\b)",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class Finding:
    path: str
    line: int
    why: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.why}"


def _is_db_call(node: ast.Call) -> bool:
    if not isinstance(node.func, ast.Attribute):
        return False
    name = node.func.attr
    return name in DB_METHODS or name.startswith("copy_")


def _add_leaves(node: ast.expr) -> Iterator[ast.expr]:
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        yield from _add_leaves(node.left)
        yield from _add_leaves(node.right)
    else:
        yield node


def _literal_text(node: ast.expr) -> str | None:
    """The text of a plain string literal, else None."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    return None


def _fstring_text(node: ast.JoinedStr) -> str | None:
    if not any(isinstance(v, ast.FormattedValue) for v in node.values):
        return None
    return " ".join(t for v in node.values if (t := _literal_text(v)) is not None)


def _concatenation_text(node: ast.BinOp) -> str | None:
    leaves = list(_add_leaves(node))
    texts = [_literal_text(leaf) for leaf in leaves]
    if all(t is not None for t in texts):
        return None  # literals only
    nested = [built_string_text(leaf) for leaf in leaves]
    parts = [t for t in texts if t] + [n for n in nested if n]
    return " ".join(parts) if parts else None


def built_string_text(node: ast.expr) -> str | None:
    """If `node` builds a string from parts at run time, its literal parts (joined); else
    None. Literal-only expressions (including "a" "b" and "a" + "b") are not built."""
    text: str | None = None
    if isinstance(node, ast.JoinedStr):
        text = _fstring_text(node)
    elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mod):
        text = _literal_text(node.left) or built_string_text(node.left)
    elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        text = _concatenation_text(node)
    elif (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "format"
    ):
        text = _literal_text(node.func.value)
    return text


def _assignments(tree: ast.Module) -> dict[str, list[ast.expr]]:
    """Every value assigned (or `+=`-added) to each plain name in the module, any scope."""
    values: dict[str, list[ast.expr]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    values.setdefault(target.id, []).append(node.value)
        elif (
            isinstance(node, ast.AnnAssign | ast.AugAssign)
            and node.value is not None
            and isinstance(node.target, ast.Name)
        ):
            value = node.value
            if isinstance(node, ast.AugAssign) and isinstance(node.op, ast.Add):
                # q += f"..." / q += x: the result is built from parts either way
                value = ast.BinOp(left=ast.Name(id=node.target.id), op=ast.Add(), right=value)
                ast.copy_location(value, node)
            values.setdefault(node.target.id, []).append(value)
    return values


def find_sql_built_from_strings(source: str, path: str = "<source>") -> list[Finding]:
    tree = ast.parse(source)
    assigned = _assignments(tree)
    findings: dict[tuple[int, str], Finding] = {}

    def flag(node: ast.expr, why: str) -> None:
        findings.setdefault((node.lineno, why), Finding(path, node.lineno, why))

    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and _is_db_call(node):
            assert isinstance(node.func, ast.Attribute)
            method = node.func.attr
            for arg in [*node.args, *(k.value for k in node.keywords)]:
                candidates = [arg]
                if isinstance(arg, ast.Name):
                    candidates = assigned.get(arg.id, [])
                for candidate in candidates:
                    text = built_string_text(candidate)
                    if text is not None and SQL_KEYWORD.search(text):
                        flag(candidate, f"SQL built from strings reaches .{method}()")
        if isinstance(node, ast.expr):
            text = built_string_text(node)
            if text is not None and SQL_STATEMENT.search(text):
                flag(node, "an SQL statement built from strings")
    return sorted(findings.values(), key=lambda f: (f.line, f.why))


def _service_sources() -> list[Path]:
    return sorted(p for p in SERVICES.rglob("*.py") if ".venv" not in p.parts)


# -- the services ----------------------------------------------------------------------------


def test_the_services_build_no_sql_from_strings() -> None:
    sources = _service_sources()
    assert len(sources) > 20  # the glob found the tree
    findings = [
        finding
        for path in sources
        for finding in find_sql_built_from_strings(
            path.read_text(encoding="utf-8"), str(path.relative_to(ROOT))
        )
    ]
    assert findings == [], "\n".join(map(str, findings))


def test_the_services_do_run_sql() -> None:
    """The check has something to look at: the services call the database directly."""
    calls = 0
    for path in _service_sources():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            calls += isinstance(node, ast.Call) and _is_db_call(node)
    assert calls > 20


# -- the checker itself ----------------------------------------------------------------------


FLAGGED = {
    "f-string, passed directly": """
        async def f(conn, name):
            await conn.fetch(f"SELECT * FROM t WHERE name = '{name}'")
    """,
    "f-string assigned to a variable, then run": """
        async def f(conn, uid):
            q = f"DELETE FROM t WHERE id = {uid}"
            await conn.execute(q)
    """,
    "% formatting": """
        async def f(conn, uid):
            await conn.fetchrow("SELECT a FROM t WHERE id = %s" % uid)
    """,
    ".format": """
        async def f(conn, v):
            await conn.execute("INSERT INTO t VALUES ({})".format(v))
    """,
    "+ concatenation": """
        async def f(conn, v):
            await conn.fetchval("SELECT 1 FROM t WHERE a = '" + v + "'")
    """,
    "+= growing a query": """
        async def f(conn, v):
            q = "SELECT a FROM t"
            q += " WHERE a = " + v
            await conn.fetch(q)
    """,
    "executemany": """
        async def f(conn, t):
            await conn.executemany(f"UPDATE {t} SET a = $1", [])
    """,
    "copy_*": """
        async def f(conn, w):
            await conn.copy_from_query(f"SELECT * FROM t WHERE {w}")
    """,
    "a wrapper's query argument (Database.fetchrow(op, query))": """
        async def f(db, w):
            await db.fetchrow("op", "SELECT a FROM t WHERE " + w)
    """,
    "a module-level query built from a setting, run in a method": """
        TABLE = get()
        _Q = f"SELECT a FROM {TABLE}"

        class S:
            async def go(self, conn):
                return await conn.fetch(_Q)
    """,
    "built, then handed to a helper (the statement shape)": """
        def build(t):
            return "DELETE FROM " + t
    """,
    "lower case, built for a helper": """
        def build(v):
            return f"update t set a = {v} where b = 1"
    """,
}

PASSED = {
    "bind parameters": """
        async def f(conn, uid):
            await conn.fetch("SELECT a FROM t WHERE id = $1", uid)
    """,
    "literal-only constants (implicit and explicit concatenation)": """
        _Q = (
            "SELECT a FROM t "
            "WHERE id = $1"
        )
        _R = "DELETE FROM t " + "WHERE id = $1"

        async def f(conn, uid):
            await conn.execute(_Q, uid)
            await conn.execute(_R, uid)
    """,
    "f-strings that are not SQL, even beside a database call": """
        async def f(conn, n):
            log.info(f"deleted {n} rows where asked")
            await conn.execute("DELETE FROM t WHERE id = $1", n)

        def msg(n):
            return f"select a plan; {n} values left"
    """,
    "an identifier quoted by the server (the tree's one f-string SQL: no keyword)": """
        async def f(conn, q):
            await conn.execute(f"CREATE DATABASE {q}")
    """,
    "a redis pipeline's execute() takes no arguments": """
        async def f(pipe):
            await pipe.execute()
    """,
}


@pytest.mark.parametrize("source", FLAGGED.values(), ids=FLAGGED.keys())
def test_the_checker_flags_sql_built_from_strings(source: str) -> None:
    assert find_sql_built_from_strings(textwrap.dedent(source)), source


@pytest.mark.parametrize("source", PASSED.values(), ids=PASSED.keys())
def test_the_checker_passes_parameterised_sql(source: str) -> None:
    assert find_sql_built_from_strings(textwrap.dedent(source)) == [], source


def test_a_finding_names_the_file_and_line() -> None:
    source = 'x = 1\n\nasync def f(conn, v):\n    await conn.fetch(f"SELECT {v} FROM t")\n'
    (finding,) = {f.line: f for f in find_sql_built_from_strings(source, "services/x.py")}.values()
    assert str(finding).startswith("services/x.py:4: ")
