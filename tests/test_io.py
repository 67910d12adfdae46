"""fastlddmm.io: round trips for every format, one clear error for every broken file, atomic writes."""

from __future__ import annotations

import os

import numpy as np
import pytest

from fastlddmm import io as flio
from fastlddmm.data import list_examples, load_example
from fastlddmm.io import MeshInfo, PointFileError, read_points, write_points

try:
    import meshio  # noqa: F401

    HAVE_MESHIO = True
except ImportError:
    HAVE_MESHIO = False

needs_meshio = pytest.mark.skipif(not HAVE_MESHIO, reason="mesh formats need meshio: pip install meshio "
                                                          "(or pip install 'fastlddmm[io]')")
MESH = [".ply", ".obj", ".vtk", ".off", ".stl"]


def _cloud(n=37, d=3, seed=0):
    # odd size, values that are not exactly representable in decimal: tests the %.17g text round trip
    return np.random.default_rng(seed).normal(size=(n, d)) * 10.0 ** np.arange(d)


def _tetra_mesh():
    """A closed triangle mesh (every vertex on a face: STL can only store those)."""
    pts = np.array([[0.0, 0.0, 0.0], [1.0, 0.1, 0.0], [0.2, 1.0, 0.1], [0.3, 0.2, 1.0], [0.5, 0.5, 0.5]]) * 1.37
    faces = np.array([[0, 2, 1], [0, 1, 3], [1, 2, 3], [0, 3, 2], [2, 4, 3]])
    return pts, faces


@pytest.mark.parametrize("ext", [".npy", ".txt", ".csv", ".xyz"])
@pytest.mark.parametrize("dim", [2, 3])
def test_round_trip_plain_formats_exact(tmp_path, ext, dim):
    pts = _cloud(d=dim)
    path = tmp_path / f"cloud{ext}"
    write_points(path, pts)
    back, info = read_points(path)
    assert back.dtype == np.float64 and back.shape == pts.shape
    np.testing.assert_array_equal(back, pts)  # exact: .npy is binary, text uses %.17g
    assert info.format == ext and info.dim == dim


@needs_meshio
@pytest.mark.parametrize("ext", [".ply", ".obj", ".vtk", ".off"])
def test_round_trip_mesh_keeps_points_and_faces(tmp_path, ext):
    pts, faces = _tetra_mesh()
    like = MeshInfo(".ply", 3, cells=[("triangle", faces)])
    write_points(tmp_path / f"m{ext}", pts, like=like)
    back, info = read_points(tmp_path / f"m{ext}")
    # float64 in ply / vtk / off; obj is text with enough digits for 1e-12 here
    np.testing.assert_allclose(back, pts, rtol=0, atol=1e-12)
    assert [kind for kind, _ in info.cells] == ["triangle"]
    np.testing.assert_array_equal(info.cells[0][1], faces)


@needs_meshio
def test_round_trip_stl_as_a_set_of_vertices(tmp_path):
    # STL stores triangles only: meshio merges and sorts their vertices, so compare as sets
    pts, faces = _tetra_mesh()
    write_points(tmp_path / "m.stl", pts, like=MeshInfo(".ply", 3, cells=[("triangle", faces)]))
    back, info = read_points(tmp_path / "m.stl")
    # STL is float32 on disk: 1e-6 relative is its precision
    np.testing.assert_allclose(np.sort(back, axis=0), np.sort(pts, axis=0), rtol=1e-6, atol=1e-6)
    tri = info.cells[0][1]
    np.testing.assert_allclose(np.sort(back[tri].reshape(-1, 3), axis=0), np.sort(pts[faces].reshape(-1, 3), axis=0),
                               rtol=1e-6, atol=1e-6)


@needs_meshio
def test_warped_mesh_keeps_the_input_faces(tmp_path):
    pts, faces = _tetra_mesh()
    like = MeshInfo(".ply", 3, cells=[("triangle", faces)])
    write_points(tmp_path / "in.ply", pts, like=like)
    src, info = read_points(tmp_path / "in.ply")
    write_points(tmp_path / "warped.ply", src * 2.0 + 1.0, like=info)
    warped, winfo = read_points(tmp_path / "warped.ply")
    np.testing.assert_allclose(warped, pts * 2.0 + 1.0, atol=1e-12)
    np.testing.assert_array_equal(winfo.cells[0][1], faces)


@needs_meshio
@pytest.mark.parametrize("ext", [".ply", ".obj", ".vtk", ".off"])
def test_point_cloud_without_faces_in_mesh_formats(tmp_path, ext):
    pts = _cloud(n=11)
    write_points(tmp_path / f"c{ext}", pts)
    back, _ = read_points(tmp_path / f"c{ext}")
    np.testing.assert_allclose(back, pts, rtol=1e-12, atol=1e-12)


@needs_meshio
def test_two_d_points_come_back_two_d_from_a_mesh(tmp_path):
    pts = _cloud(n=9, d=2)
    write_points(tmp_path / "flat.ply", pts)
    back, info = read_points(tmp_path / "flat.ply")
    assert back.shape == (9, 2) and info.dim == 2
    np.testing.assert_allclose(back, pts, atol=1e-12)
    back3, _ = read_points(tmp_path / "flat.ply", dim=3)
    assert back3.shape == (9, 3) and not back3[:, 2].any()


def test_text_header_and_comma_separated(tmp_path):
    path = tmp_path / "pts.csv"
    path.write_text("x, y, z\n# a comment\n1, 2, 3\n4.5,5,6e-3  # trailing comment\n")
    pts, info = read_points(path)
    np.testing.assert_array_equal(pts, [[1, 2, 3], [4.5, 5, 6e-3]])
    assert info.header == "x, y, z" and info.delimiter == ","
    write_points(tmp_path / "out.csv", pts + 1, like=info)
    assert (tmp_path / "out.csv").read_text().splitlines()[0] == "x, y, z"  # the header is kept
    np.testing.assert_array_equal(read_points(tmp_path / "out.csv")[0], pts + 1)


def test_whitespace_text_without_header(tmp_path):
    path = tmp_path / "pts.txt"
    path.write_text("1 2\n\n3\t4\n")
    pts, info = read_points(path)
    np.testing.assert_array_equal(pts, [[1, 2], [3, 4]])
    assert info.header is None


def test_torch_tensor_is_accepted(tmp_path):
    torch = pytest.importorskip("torch")
    t = torch.arange(12, dtype=torch.float32).reshape(4, 3)
    write_points(tmp_path / "t.npy", t)
    np.testing.assert_array_equal(read_points(tmp_path / "t.npy")[0], t.numpy())


# -- broken files: one PointFileError naming the file ---------------------------------------------------

def _expect_error(path, *fragments):
    with pytest.raises(PointFileError) as err:
        read_points(path)
    message = str(err.value)
    assert message.startswith(f"cannot read {str(path)!r}: "), message
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


def _truncate(path, keep):
    data = path.read_bytes()
    path.write_bytes(data[: keep if keep >= 0 else len(data) + keep])


def test_missing_file_and_unknown_extension(tmp_path):
    _expect_error(tmp_path / "nope.npy", "no such file")
    (tmp_path / "a.xyzw").write_text("1 2 3\n")
    _expect_error(tmp_path / "a.xyzw", "unknown extension")
    (tmp_path / "empty.ply").write_bytes(b"")
    _expect_error(tmp_path / "empty.ply", "empty")


def test_truncated_npy(tmp_path):
    np.save(tmp_path / "a.npy", _cloud())
    _truncate(tmp_path / "a.npy", -9)
    _expect_error(tmp_path / "a.npy", "not a valid .npy")
    _truncate(tmp_path / "a.npy", 20)  # inside the header
    _expect_error(tmp_path / "a.npy", ".npy")


def test_npy_with_pickled_objects_is_refused(tmp_path):
    np.save(tmp_path / "o.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    _expect_error(tmp_path / "o.npy", "pickled")


def test_npy_wrong_shapes_and_values(tmp_path):
    np.save(tmp_path / "v.npy", np.arange(5.0))
    _expect_error(tmp_path / "v.npy", "shape (5,)")
    np.save(tmp_path / "e.npy", np.zeros((0, 3)))
    _expect_error(tmp_path / "e.npy", "empty")
    bad = _cloud()
    bad[3, 1] = np.nan
    bad[8, 0] = np.inf
    np.save(tmp_path / "n.npy", bad)
    _expect_error(tmp_path / "n.npy", "NaN or Inf", "rows 3, 8")
    np.save(tmp_path / "s.npy", np.array([["a", "b"]]))
    _expect_error(tmp_path / "s.npy", "expected numbers")


def test_malformed_text(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("1 2 3\n4 5\n")
    _expect_error(path, "line 2 has 2 values, expected 3")
    path.write_text("1 2 3\n4 five 6\n")
    _expect_error(path, "line 2", "'five' is not a number")
    path.write_text("x y z\n")
    _expect_error(path, "only a header")
    path.write_text("1 2 3\nnan 0 0\n")
    _expect_error(path, "NaN or Inf")
    path.write_bytes(b"\xff\xfe\x00garbage")
    _expect_error(path, "not a text file")


@needs_meshio
@pytest.mark.parametrize("ext", MESH)
def test_truncated_and_garbage_meshes(tmp_path, ext, capfd):
    pts, faces = _tetra_mesh()
    like = MeshInfo(".ply", 3, cells=[("triangle", faces)])
    good = tmp_path / f"good{ext}"
    write_points(good, pts, like=like)
    bad = tmp_path / f"bad{ext}"
    bad.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    try:
        read_points(bad)
    except PointFileError as err:  # the expected outcome for most formats
        assert str(err).startswith(f"cannot read {str(bad)!r}: ") and "\n" not in str(err)
    else:  # a text format cut at a line boundary can still be a valid (smaller) file: then it must read cleanly
        assert ext in (".obj",), f"a half {ext} file was read without error"
    bad.write_bytes(b"\x00\x01garbage garbage\n" * 10)
    _expect_error(bad)
    # meshio prints parser errors itself and may call sys.exit: nothing may leak to the terminal
    out, errs = capfd.readouterr()
    assert out == "" and errs == "", (out, errs)


def test_missing_meshio_gives_install_hint(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_meshio(name, *args, **kwargs):
        if name == "meshio" or name.startswith("meshio."):
            raise ImportError("No module named 'meshio'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_meshio)
    (tmp_path / "m.ply").write_text("ply\n")
    with pytest.raises(PointFileError, match=r"pip install 'fastlddmm\[io\]'"):
        read_points(tmp_path / "m.ply")
    with pytest.raises(PointFileError, match=r"pip install 'fastlddmm\[io\]'"):
        write_points(tmp_path / "w.ply", _cloud())


# -- writing ------------------------------------------------------------------------------------------

def test_write_refuses_bad_points(tmp_path):
    with pytest.raises(PointFileError, match="NaN or Inf"):
        write_points(tmp_path / "a.npy", np.array([[0.0, np.nan]]))
    with pytest.raises(PointFileError, match="empty"):
        write_points(tmp_path / "a.npy", np.zeros((0, 3)))
    with pytest.raises(PointFileError, match="unknown extension"):
        write_points(tmp_path / "a.bin", _cloud())
    with pytest.raises(TypeError, match="like"):
        write_points(tmp_path / "a.npy", _cloud(), like={"cells": []})
    assert not any(tmp_path.iterdir())  # nothing half-written left behind


@needs_meshio
def test_write_mesh_errors(tmp_path):
    with pytest.raises(PointFileError, match="STL stores triangles only"):
        write_points(tmp_path / "a.stl", _cloud())
    pts, faces = _tetra_mesh()
    with pytest.raises(PointFileError, match="refer to vertex 4"):
        write_points(tmp_path / "a.ply", pts[:3], like=MeshInfo(".ply", 3, cells=[("triangle", faces)]))
    with pytest.raises(PointFileError, match="at most 3 coordinates"):
        write_points(tmp_path / "a.ply", _cloud(d=4))
    assert not any(tmp_path.iterdir())


def test_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "keep.npy"
    write_points(path, _cloud())
    before = path.read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(np, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        write_points(path, _cloud(seed=1))
    assert path.read_bytes() == before  # the old file is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.npy"]  # and no temporary file is left


def test_written_files_have_ordinary_permissions(tmp_path):
    write_points(tmp_path / "p.csv", _cloud())
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "p.csv").stat().st_mode & 0o777 == 0o666 & ~mask


# -- built-in examples ----------------------------------------------------------------------------------

def test_examples_load():
    assert set(list_examples()) == {"face", "blob"}
    face = load_example("face")
    assert face["source"].shape == face["target"].shape and face["source"].shape[1] == 2
    assert 200 <= face["source"].shape[0] <= 400
    e = face["edges"]
    assert e.dtype == np.int64 and e.shape[1] == 2 and e.min() >= 0 and e.max() < face["source"].shape[0]
    # the mouth differs (smile vs neutral) but the outline is the same curve
    assert not np.allclose(face["source"], face["target"])
    np.testing.assert_array_equal(face["source"][:120], face["target"][:120])
    blob = load_example("blob")
    assert blob["source"].shape[1] == 3 and 1000 <= blob["source"].shape[0] <= 2000
    assert blob["faces"].max() == blob["source"].shape[0] - 1  # every vertex is on the surface
    for arr in (face["source"], face["target"], blob["source"], blob["target"]):
        assert np.isfinite(arr).all()
    with pytest.raises(ValueError, match="unknown example 'hand'"):
        load_example("hand")


def test_examples_match_their_generator(tmp_path):
    # the shipped files are what make_examples.py writes (it is deterministic)
    pytest.importorskip("scipy", reason="regenerating the blob's faces needs scipy: pip install scipy")
    from fastlddmm.data import make_examples

    for path in make_examples.write_all(tmp_path):
        shipped = np.load(os.path.join(os.path.dirname(make_examples.__file__), path.name))
        made = np.load(path)
        assert made.shape == shipped.shape and made.dtype == shipped.dtype, path.name
        if np.issubdtype(shipped.dtype, np.integer):  # faces and edges: exact
            np.testing.assert_array_equal(made, shipped)
        else:
            # Coordinates come from numpy's sin/cos, whose SIMD code differs by CPU (AVX2 vs AVX-512 give
            # results 1 ulp apart): a few ulps of float64 at the clouds' scale, far below anything visible.
            np.testing.assert_allclose(made, shipped, rtol=1e-13, atol=1e-13 * float(np.abs(shipped).max()))
