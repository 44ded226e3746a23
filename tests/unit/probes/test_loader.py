"""The loader hands bcc the connection program as one text: conn.bpf.c with its units spliced in."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from otel_envoy.events.layout import BPF_DIR
from otel_envoy.probes.loader import CONN_PROGRAM, UNIT_INCLUDE, ProbeConfig, program_text

LINE = re.compile(r'^#line (\d+) "(.+)"$')


def _origins(text: str) -> list[tuple[str, Path, int]]:
    """Every line of ``text`` but the #line markers, with the file and line number the markers give it."""
    out = []
    path, number = None, 0
    for line in text.split("\n"):
        m = LINE.match(line)
        if m:
            path, number = Path(m.group(2)), int(m.group(1))
            continue
        assert path is not None, "the text must start with a #line marker"
        out.append((line, path, number))
        number += 1
    return out


def test_every_unit_is_spliced_once_and_each_line_names_its_origin():
    text = program_text(BPF_DIR)
    units = sorted(p.name for p in BPF_DIR.glob("*.bpf.h"))
    assert len(units) >= 5
    assert not UNIT_INCLUDE.search(text)  # bcc must not see a unit through clang's #include
    assert '#include "events.h"' in text  # plain C: a real include, found through -I
    for unit in units:
        assert text.count(f'#line 1 "{BPF_DIR / unit}"') == 1, unit
    sources = {p: p.read_text().split("\n") for p in BPF_DIR.iterdir() if p.suffix in (".c", ".h")}
    origins = _origins(text)
    spliced = {path.name for _, path, _ in origins}
    assert spliced == set(units) | {CONN_PROGRAM}
    for line, path, number in origins:
        assert sources[path][number - 1] == line, f"{path.name}:{number}"


def test_units_stay_small():
    for path in [BPF_DIR / CONN_PROGRAM, *BPF_DIR.glob("*.bpf.h")]:
        assert len(path.read_text().splitlines()) <= 700, path.name


def test_a_unit_included_twice_is_spliced_once_and_a_missing_one_fails(tmp_path):
    (tmp_path / "a.bpf.h").write_text("int a;\n")
    (tmp_path / "b.bpf.h").write_text('#include "a.bpf.h"\nint b;\n')
    (tmp_path / CONN_PROGRAM).write_text('#include "a.bpf.h"\n#include "b.bpf.h"\nint main;\n')
    origins = [(line, path.name, n) for line, path, n in _origins(program_text(tmp_path)) if line]
    assert origins == [("int a;", "a.bpf.h", 1), ("int b;", "b.bpf.h", 2), ("int main;", CONN_PROGRAM, 3)]
    (tmp_path / CONN_PROGRAM).write_text('#include "gone.bpf.h"\n')
    with pytest.raises(FileNotFoundError):
        program_text(tmp_path)


def test_the_program_dir_is_on_the_include_path():
    assert f"-I{BPF_DIR}" in ProbeConfig().cflags()
