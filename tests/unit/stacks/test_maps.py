"""Process maps (stacks/maps.py): /proc/<pid>/maps lines."""

from __future__ import annotations

from otel_envoy.stacks import parse_maps


def test_parse_maps_handles_spaces_deleted_and_anonymous() -> None:
    maps = parse_maps(
        "55d0c0a00000-55d0c0a01000 r-xp 00001000 fd:01 1234 /opt/my dir/envoy (deleted)\n"
        "7ffd1000-7ffd2000 r-xp 00000000 00:00 0 [vdso]\n"
        "7f0000000000-7f0000001000 rwxp 00000000 00:00 0\n"
        "garbage\n"
    )
    assert len(maps) == 3
    assert maps[0].file_path == "/opt/my dir/envoy" and maps[0].file_backed and maps[0].executable
    assert maps[0].file_offset(0x55D0C0A00010) == 0x1010
    assert not maps[1].file_backed and maps[1].path == "[vdso]"
    assert maps[2].path == "" and not maps[2].file_backed
