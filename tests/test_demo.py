"""`mmrwkv demo` on the bundled models: outputs written, bad arguments rejected with exit 2."""
import contextlib
import io

import mido
import pytest
from PIL import Image

from multimodal_rwkv.cli import main


def run(*argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main([str(a) for a in argv])
        except SystemExit as e:
            rc = e.code
    return rc, out.getvalue(), err.getvalue()


def test_demo_writes_music_and_answers(tmp_path):
    img = tmp_path / "mine.png"
    Image.new("RGB", (80, 60), (200, 30, 30)).save(img)
    rc, out, err = run("demo", "--out", tmp_path / "out", "--seconds", "3", "--image", img)
    assert rc == 0, err
    midi = mido.MidiFile(str(tmp_path / "out" / "song.mid"))
    assert any(m.type == "note_on" and m.velocity > 0 for tr in midi.tracks for m in tr)
    assert Image.open(tmp_path / "out" / "song.png").size[0] > 100
    assert "Written:" in out and "Go on:" in out


@pytest.mark.parametrize("argv,needle", [
    (("demo", "--image", "/nonexistent/pic.png"), "/nonexistent/pic.png"),
    (("demo", "--seconds", "-1"), "--seconds"),
    (("demo", "--image", __file__), "not a recognised image"),  # said before the demo runs
    (("demo", "--bogus"), "unrecognized arguments"),
    (("demo", "--question", "hi"), "--question is asked about an --image"),  # was silently ignored
    (("demo", "--skip-vision", "--image", "/nonexistent/pic.png"), "--skip-vision"),
    (("demo", "--image", "/nonexistent/pic.png", "--question", ""), "--question is empty"),  # as vqa says
    (("demo", "--image", "/nonexistent/pic.png", "--question", "  "), "--question is empty"),
])
def test_demo_bad_arguments_exit_2(argv, needle):
    rc, out, err = run(*argv)
    assert rc == 2 and needle in err and "Traceback" not in err


def test_demo_asks_each_image_its_own_question(tmp_path):
    """--question was one value: a second one replaced the first for every --image, silently."""
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(a)
    Image.new("RGB", (64, 64), (30, 30, 200)).save(b)
    rc, out, err = run("demo", "--out", tmp_path / "o", "--skip-music", "--image", a, "--question", "What colour?",
                       "--image", b, "--question", "How many shapes?")
    assert rc == 0, err
    assert f"{a}: 'What colour?' ->" in out and f"{b}: 'How many shapes?' ->" in out
    rc, out, err = run("demo", "--out", tmp_path / "o2", "--skip-music", "--image", a, "--image", b,
                       "--question", "What colour?")  # one question: asked about every image
    assert rc == 0 and f"{a}: 'What colour?'" in out and f"{b}: 'What colour?'" in out, err
    rc, out, err = run("demo", "--out", tmp_path / "o3", "--skip-music", "--image", a, "--question", "x?",
                       "--question", "y?")
    assert rc == 2 and "2 --question for 1 --image" in err


def test_demo_on_a_full_disk_names_the_file_and_leaves_no_empty_scene(tmp_path, monkeypatch):
    """A scene was saved in place: a full disk left a 0-byte scene_0.png, and the error named no file."""
    def full(self, fp, *a, **k):
        open(fp, "wb").close()  # the file made, nothing in it
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", full)
    (tmp_path / "out").mkdir()
    rc, out, err = run("demo", "--out", tmp_path / "out", "--skip-music")
    assert rc == 2 and f"{tmp_path / 'out' / 'scene_0.png'}: No space left on device" in err, err
    assert list((tmp_path / "out").iterdir()) == []


def test_demo_never_draws_over_its_image_input(tmp_path):
    """--image out/scene_0.png was overwritten by the scene the demo draws there (exit 0)."""
    from PIL import Image

    (tmp_path / "out").mkdir()
    img = tmp_path / "out" / "scene_0.png"
    Image.new("RGB", (32, 32), (200, 10, 10)).save(img)
    before = img.read_bytes()
    rc, out, err = run("demo", "--out", tmp_path / "out", "--skip-music", "--image", img)
    assert rc == 2 and "would draw over this --image" in err and "Traceback" not in err
    assert img.read_bytes() == before


def test_demo_with_both_parts_skipped_is_an_error(tmp_path):
    """--skip-music --skip-vision: nothing to do, said (it exited 0 having done nothing), nothing written."""
    rc, out, err = run("demo", "--out", tmp_path / "out", "--skip-music", "--skip-vision")
    assert rc == 2 and "--skip-music and --skip-vision together leave the demo nothing to do" in err
    assert not (tmp_path / "out").exists()


def test_demo_refuses_a_bad_question_or_output_before_making_music(tmp_path):
    """A question of only <image>, two placeholders or not-UTF-8 bytes, and a folder where a scene
    goes, were found only after the music was generated (and "question 0" named no option)."""
    img = tmp_path / "mine.png"
    Image.new("RGB", (20, 20), (10, 200, 10)).save(img)
    for question, needle in (("<image>", "--question is empty"),
                             ("<image> <image> how many?", "--question holds 2 <image> placeholders"),
                             ("bad \udcff", "--question holds bytes that are not UTF-8")):
        rc, out, err = run("demo", "--out", tmp_path / "o", "--seconds", "3", "--image", img, "--question", question)
        assert rc == 2 and needle in err and "[music]" not in out, (question, err)
        assert not (tmp_path / "o").exists()
    (tmp_path / "o2" / "scene_1.png").mkdir(parents=True)
    rc, out, err = run("demo", "--out", tmp_path / "o2", "--seconds", "3")
    assert rc == 2 and "scene_1.png is a folder, not a file name" in err and "[music]" not in out
    assert sorted(p.name for p in (tmp_path / "o2").iterdir()) == ["scene_1.png"]


def test_a_failed_demo_removes_the_folders_it_made(tmp_path, monkeypatch):
    """A write failure left the new output folders (and their new parents) behind, empty."""
    from multimodal_rwkv import demo

    def full(args, out):
        raise OSError(27, "File too large", str(out / "song.png"))

    monkeypatch.setattr(demo, "_demo_music", full)
    assert main(["demo", "--out", str(tmp_path / "new" / "a" / "b"), "--skip-vision"]) == 2
    assert list(tmp_path.iterdir()) == []
