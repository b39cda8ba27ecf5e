"""The strace reader of the durability tests (tests/durability.py): parsing and the publish rules."""

from __future__ import annotations

from tests.durability import Call, creation_problems, parse_strace, publish_problems

T = "/ck/.tmp-iteration_00000001"
F = "/ck/iteration_00000001"

# A save as strace -f -y prints it: two writer threads interleaved, a failed mkdir, the commit.
GOOD = f"""\
100  mkdir("/ck", 0777) = -1 EEXIST (File exists)
100  mkdir("{T}", 0777) = 0
101  openat(AT_FDCWD, "{T}/a.safetensors", O_WRONLY|O_CREAT|O_EXCL|O_CLOEXEC, 0644) = 5</ck/.tmp-iteration_00000001/a.safetensors>
102  openat(AT_FDCWD, "{T}/b.safetensors", O_WRONLY|O_CREAT|O_EXCL|O_CLOEXEC, 0644) = 6<{T}/b.safetensors>
101  pwrite64(5<{T}/a.safetensors>, "\\x10\\x00"..., 4096, 0) = 4096
102  write(6<{T}/b.safetensors>, "abc,de)f"..., 8) = 8
101  fsync(5<{T}/a.safetensors> <unfinished ...>
102  fsync(6<{T}/b.safetensors>) = 0
101  <... fsync resumed>) = 0
100  openat(AT_FDCWD, "{T}/metadata.json", O_WRONLY|O_CREAT|O_TRUNC|O_CLOEXEC, 0666) = 3<{T}/metadata.json>
100  write(3<{T}/metadata.json>, "{{\\"format"..., 300) = 300
100  fdatasync(3<{T}/metadata.json>) = 0
100  fsync(3<{T}>) = 0
100  renameat2(AT_FDCWD, "{T}", 4</ck>, "iteration_00000001", 0) = 0
100  fsync(3</ck>) = 0
"""
MEMBERS = ["a.safetensors", "b.safetensors", "metadata.json"]


def test_parse_joins_resumed_calls_resolves_dirfds_and_drops_failures():
    calls = parse_strace(GOOD)
    assert calls[0] == Call("mkdir", (T,))  # the failed mkdir of /ck is left out
    assert Call("sync", (f"{T}/a.safetensors",)) in calls  # unfinished + resumed, placed where it completed
    assert calls.index(Call("sync", (f"{T}/a.safetensors",))) > calls.index(Call("sync", (f"{T}/b.safetensors",)))
    assert Call("write", (f"{T}/b.safetensors",)) in calls  # a ')' inside the data does not end the call
    assert Call("rename", (T, F)) in calls  # "iteration_00000001" relative to 4</ck>
    assert calls[-1] == Call("sync", ("/ck",))


def test_a_folder_published_after_every_fsync_has_no_problem():
    assert publish_problems(parse_strace(GOOD), F, MEMBERS) == []


def test_a_data_file_never_fsynced_is_named():
    trace = GOOD.replace(f"101  fsync(5<{T}/a.safetensors> <unfinished ...>\n", "").replace(
        "101  <... fsync resumed>) = 0\n", "")
    assert publish_problems(parse_strace(trace), F, MEMBERS) == [
        f"{T}/a.safetensors: not fsynced before the rename to {F}"]


def test_a_write_after_the_fsync_is_named():
    trace = GOOD.replace("100  fsync(3<" + T + ">) = 0\n",
                         f"101  pwrite64(5<{T}/a.safetensors>, \"x\"..., 1, 0) = 1\n100  fsync(3<{T}>) = 0\n")
    assert publish_problems(parse_strace(trace), F, MEMBERS) == [
        f"{T}/a.safetensors: written again after its fsync, before the rename to {F}"]


def test_missing_folder_and_parent_fsyncs_are_named():
    trace = GOOD.replace(f"100  fsync(3<{T}>) = 0\n", "").replace("100  fsync(3</ck>) = 0\n", "")
    assert publish_problems(parse_strace(trace), F, MEMBERS) == [
        f"{T}: folder not fsynced before the rename to {F}",
        f"/ck: not fsynced after the rename that published {F}"]


def test_an_fsync_after_the_rename_does_not_count_for_the_files():
    trace = GOOD.replace(f"102  fsync(6<{T}/b.safetensors>) = 0\n", "") + f"102  fsync(6<{F}/b.safetensors>) = 0\n"
    assert publish_problems(parse_strace(trace), F, MEMBERS) == [
        f"{T}/b.safetensors: not fsynced before the rename to {F}"]


def test_a_file_published_by_rename_and_a_subfolder():
    trace = (f'7  fsync(3</r/rank_0/.f.tmp-7-0a0b0c0d>) = 0\n'
             f'7  rename("/r/rank_0/.f.tmp-7-0a0b0c0d", "/r/rank_0/f") = 0\n'
             f'7  fsync(3</r/rank_0>) = 0\n')
    assert publish_problems(parse_strace(trace), "/r/rank_0/f") == []
    assert publish_problems(parse_strace(trace), "/r/rank_0/g") == ["/r/rank_0/g: no rename published it"]
    sub = (f'7  fsync(3</o/.x.tmp-7-0a0b0c0d/d/f>) = 0\n7  fsync(3</o/.x.tmp-7-0a0b0c0d>) = 0\n'
           f'7  rename("/o/.x.tmp-7-0a0b0c0d", "/o/x") = 0\n7  fsync(3</o>) = 0\n')
    assert publish_problems(parse_strace(sub), "/o/x", ["d/", "d/f"]) == [
        "/o/.x.tmp-7-0a0b0c0d/d: folder not fsynced before the rename to /o/x"]


def test_a_created_folder_needs_its_parent_fsynced_after_the_mkdir():
    calls = parse_strace('1  fsync(3</out>) = 0\n1  mkdir("/out/checkpoint", 0777) = 0\n')
    assert creation_problems(calls, "/out/checkpoint") == ["/out: not fsynced after /out/checkpoint was created in it"]
    calls = parse_strace('1  mkdir("/out/checkpoint", 0777) = 0\n1  fsync(3</out>) = 0\n')
    assert creation_problems(calls, "/out/checkpoint") == []
    assert creation_problems(calls, "/out/other") == ["/out/other: no mkdir created it in this run"]
