"""Reading and writing point clouds: .npy, .txt / .csv, and meshes through meshio.

    points, info = read_points("face.ply")          # points: (N, D) float64 numpy array
    write_points("warped.ply", moved, like=info)    # keeps the faces / cells of the input mesh

Formats (chosen by the file extension):
    .npy            a 2-D array (N, D) of numbers (read with allow_pickle=False: no code is executed)
    .txt, .csv      one point per line, columns separated by whitespace or commas; an optional header
                    line (e.g. ``x,y,z``) and ``#`` comments are allowed
    .ply .obj .vtk .off .stl
                    meshes through meshio (``pip install 'fastlddmm[io]'``): the points are the
                    vertices; writing with ``like=info`` of a mesh keeps its cells (faces). Mesh
                    formats store 3 coordinates, so 2-D points are written with z = 0, and a mesh
                    whose z is 0 everywhere is read back as 2-D (see ``read_points(dim=...)``).

Every problem with a file (missing, truncated, malformed, NaN / Inf, empty) raises one
``PointFileError`` naming the file and what is wrong, never a parser's internal traceback.
Writes are atomic (fastlddmm._atomic): a temporary file in the same folder, then one rename.
"""

from __future__ import annotations

import contextlib
import io as _io
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ._atomic import atomic_write

__all__ = ["MESH_EXTENSIONS", "EXTENSIONS", "MeshInfo", "PointFileError", "read_points", "write_points"]

MESH_EXTENSIONS = (".ply", ".obj", ".vtk", ".off", ".stl")
TEXT_EXTENSIONS = (".txt", ".csv", ".xyz")
EXTENSIONS = (".npy",) + TEXT_EXTENSIONS + MESH_EXTENSIONS
_MESHIO_FORMATS = {".ply": "ply", ".obj": "obj", ".vtk": "vtk", ".off": "off", ".stl": "stl"}


class PointFileError(ValueError):
    """A point file cannot be read or written; the message names the file and the problem."""


@dataclass
class MeshInfo:
    """What ``read_points`` learned about a file beyond its points, so a write can mirror it.

    Attributes:
        format: the extension it was read from (".npy", ".csv", ".ply", ...).
        dim: number of coordinates per point as returned by read_points.
        cells: for meshes, a list of (cell type, (K, n) int array) pairs, e.g. [("triangle", faces)].
        header: for text files, the header line (without the newline), or None.
        delimiter: for text files, "," or None (whitespace).
    """

    format: str
    dim: int
    cells: list = field(default_factory=list)
    header: str | None = None
    delimiter: str | None = None

    def edges(self) -> np.ndarray | None:  # (E, 2) int64, or None
        """Segments of the mesh's "line" cells (a 2-D curve drawn as lines), or None when it has none."""
        lines = [np.asarray(data) for kind, data in self.cells if kind == "line"]
        return np.concatenate(lines).astype(np.int64) if lines else None

    def triangles(self) -> np.ndarray | None:  # (F, 3) int64, or None
        """The mesh's surface as triangles ("triangle" cells; each "quad" split in two), or None when it has
        no faces (a point cloud, a curve)."""
        parts = []
        for kind, data in self.cells:
            data = np.asarray(data, dtype=np.int64)
            if kind == "triangle":
                parts.append(data)
            elif kind == "quad":  # (a, b, c, d) -> (a, b, c), (a, c, d): the same orientation
                parts += [data[:, [0, 1, 2]], data[:, [0, 2, 3]]]
        return np.concatenate(parts) if parts else None


def _ext(path: Path) -> str:
    return path.suffix.lower()


def _fail(path, problem: str) -> PointFileError:
    return PointFileError(f"cannot read {str(path)!r}: {problem}")


def _short(err: BaseException) -> str:
    """One line describing an exception from a parser (its first line, with its type)."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def _import_meshio(path, action: str):
    try:
        import meshio
    except ImportError:
        raise PointFileError(
            f"cannot {action} {str(path)!r}: mesh formats ({', '.join(MESH_EXTENSIONS)}) need meshio: "
            f"pip install 'fastlddmm[io]' (or pip install meshio), or use .npy / .txt / .csv"
        ) from None
    return meshio


@contextlib.contextmanager
def _quiet_meshio():
    """meshio prints its warnings and read errors to stdout/stderr (and may call sys.exit): capture them,
    so that our one error message carries what went wrong. Yields the StringIO holding the printed text."""
    logger = logging.getLogger("meshio")
    old = logger.level
    logger.setLevel(logging.ERROR)
    printed = _io.StringIO()
    try:
        with warnings.catch_warnings(), np.errstate(all="ignore"), \
                contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
            warnings.simplefilter("ignore")
            yield printed
    finally:
        logger.setLevel(old)


def _printed_reason(printed: _io.StringIO) -> str:
    lines = [line.strip() for line in printed.getvalue().splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith(("Error: Couldn't read", "Warning:"))]
    return lines[0] if lines else "meshio could not parse it"


def _check_cloud(points: np.ndarray, path, *, reading: bool = True) -> np.ndarray:
    fail = _fail if reading else (lambda p, m: PointFileError(f"cannot write {str(p)!r}: {m}"))
    if points.dtype.kind not in "biuf":
        raise fail(path, f"expected numbers, got an array of dtype {points.dtype}")
    if points.size == 0 and points.ndim <= 2 and (points.ndim < 2 or points.shape[0] == 0):
        raise fail(path, "the point cloud is empty (0 points)")
    if points.ndim != 2:
        raise fail(path, f"expected a 2-D array of points (N, D), got shape {points.shape}")
    if points.shape[0] == 0:
        raise fail(path, "the point cloud is empty (0 points)")
    if points.shape[1] == 0:
        raise fail(path, f"the points have no coordinates (shape {points.shape})")
    points = points.astype(np.float64, copy=False)
    bad = ~np.isfinite(points).all(axis=1)
    if bad.any():
        rows = np.flatnonzero(bad)
        shown = ", ".join(str(r) for r in rows[:5]) + (", ..." if rows.size > 5 else "")
        raise fail(path, f"{rows.size} point(s) have NaN or Inf coordinates (rows {shown})")
    return points


# -- reading ----------------------------------------------------------------------------------------

def _read_npy(path: Path) -> tuple[np.ndarray, MeshInfo]:
    try:
        arr = np.load(path, allow_pickle=False)
    except ValueError as err:
        if "pickle" in str(err).lower():
            raise _fail(path, "it holds Python objects (pickled data), not a numeric array") from None
        raise _fail(path, f"not a valid .npy file ({_short(err)})") from None
    except (EOFError, OSError) as err:
        raise _fail(path, f"truncated or not a .npy file ({_short(err)})") from None
    if isinstance(arr, np.lib.npyio.NpzFile):  # np.load opens zip archives whatever the extension
        arr.close()
        raise _fail(path, "it is an .npz archive, not a .npy array")
    points = _check_cloud(np.asarray(arr), path)
    return points, MeshInfo(".npy", points.shape[1])


def _is_number(token: str) -> bool:
    try:
        float(token)
        return True
    except ValueError:
        return False


def _read_text(path: Path) -> tuple[np.ndarray, MeshInfo]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise _fail(path, "not a text file (it is not valid UTF-8)") from None
    lines = [(i + 1, line.split("#", 1)[0].strip()) for i, line in enumerate(text.splitlines())]
    lines = [(n, line) for n, line in lines if line]
    if not lines:
        raise _fail(path, "the point cloud is empty (no data lines)")
    delimiter = "," if any("," in line for _, line in lines[:2]) else None

    def split(line: str) -> list[str]:
        return [t.strip() for t in line.split(delimiter)] if delimiter else line.split()

    header = None
    first = split(lines[0][1])
    if not all(_is_number(t) for t in first):
        header = lines[0][1]
        lines = lines[1:]
        if not lines:
            raise _fail(path, "the point cloud is empty (only a header line)")
    rows = []
    width = None
    for number, line in lines:
        tokens = split(line)
        if width is None:
            width = len(tokens)
        if len(tokens) != width:
            raise _fail(path, f"line {number} has {len(tokens)} values, expected {width} like the first point")
        try:
            rows.append([float(t) for t in tokens])
        except ValueError:
            bad = next(t for t in tokens if not _is_number(t))
            raise _fail(path, f"line {number}: {bad!r} is not a number") from None
    points = _check_cloud(np.array(rows, dtype=np.float64), path)
    return points, MeshInfo(_ext(path), points.shape[1], header=header, delimiter=delimiter)


def _ply_header_counts(path: Path) -> dict[str, int]:
    """Element counts announced by a PLY header. meshio loops forever on a header cut before
    ``end_header``, so a missing one is reported here first."""
    with path.open("rb") as f:
        head = f.read(1 << 20)
    if not head.startswith(b"ply"):
        raise _fail(path, "malformed .ply file (it does not start with 'ply')")
    end = head.find(b"end_header")
    if end < 0:
        raise _fail(path, "truncated or malformed .ply file (the header has no end_header line)")
    counts = {}
    for line in head[:end].decode("latin-1").splitlines():
        words = line.split()
        if len(words) == 3 and words[0] == "element":
            try:
                counts[words[1]] = int(words[2])
            except ValueError:
                raise _fail(path, f"malformed .ply header line {line.strip()!r}") from None
    return counts


def _off_check(path: Path) -> None:
    """An OFF file must hold the vertex and face lines its header announces (meshio can loop forever
    on a file cut inside its header, and silently reads a file cut in its body)."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise _fail(path, "malformed .off file (not text)") from None
    lines = [line.split("#", 1)[0].split() for line in text.splitlines()]
    lines = [words for words in lines if words]
    if not lines or not lines[0][0].endswith("OFF"):
        raise _fail(path, "malformed .off file (expected the first line to be 'OFF')")
    counts = lines[0][1:] if len(lines[0]) > 1 else (lines[1] if len(lines) > 1 else [])
    body = lines[1:] if len(lines[0]) > 1 else lines[2:]
    try:
        n_vertices, n_faces = int(counts[0]), int(counts[1])
    except (IndexError, ValueError):
        raise _fail(path, "truncated or malformed .off file (no vertex and face counts after 'OFF')") from None
    if len(body) < n_vertices + n_faces:
        raise _fail(path, f"truncated .off file: the header announces {n_vertices} vertices and {n_faces} faces, "
                          f"but only {len(body)} lines follow")


def _stl_check(path: Path) -> None:
    """An ASCII STL must end with ``endsolid`` (else it was cut, and meshio would read fewer triangles)."""
    with path.open("rb") as f:
        start = f.read(512)
        f.seek(max(0, path.stat().st_size - 512))
        tail = f.read()
    if start.lstrip().startswith(b"solid") and b"facet" in start and b"endsolid" not in tail:
        raise _fail(path, "truncated .stl file (the ASCII solid has no endsolid line)")


def _read_mesh(path: Path, dim: int | None) -> tuple[np.ndarray, MeshInfo]:
    meshio = _import_meshio(path, "read")
    ext = _ext(path)
    announced = _ply_header_counts(path) if ext == ".ply" else None
    if ext == ".off":
        _off_check(path)
    if ext == ".stl":
        _stl_check(path)
    with _quiet_meshio() as printed:
        try:
            mesh = meshio.read(str(path), file_format=_MESHIO_FORMATS[_ext(path)])
        except SystemExit:  # meshio prints the parser's ReadError, then calls sys.exit(1)
            raise _fail(path, f"malformed {_ext(path)} file ({_printed_reason(printed)})") from None
        except Exception as err:  # meshio's parsers raise anything from IndexError to struct.error
            raise _fail(path, f"truncated or malformed {_ext(path)} file ({_short(err)})") from None
    points = np.asarray(mesh.points)
    points = points.astype(points.dtype.newbyteorder("="), copy=False) if points.dtype.kind == "f" else points
    points = _check_cloud(points, path)
    if announced is not None:
        n_faces = sum(len(block.data) for block in mesh.cells if block.dim == 2)
        if announced.get("vertex", points.shape[0]) != points.shape[0] or announced.get("face", n_faces) != n_faces:
            raise _fail(path, f"truncated .ply file: the header announces {announced.get('vertex')} vertices and "
                              f"{announced.get('face', 0)} faces, the file holds {points.shape[0]} and {n_faces}")
    cells = []
    for block in mesh.cells:
        data = np.asarray(block.data)
        if data.size and (data.min() < 0 or data.max() >= points.shape[0]):
            raise _fail(path, f"its {block.type} cells refer to vertices that do not exist")
        cells.append((block.type, data.astype(np.int64)))
    # meshio pads to 3 coordinates; a flat mesh (z = 0 everywhere) is a 2-D shape.
    if dim is None and points.shape[1] == 3 and not points[:, 2].any():
        dim = 2
    if dim is not None:
        if dim < points.shape[1] and points[:, dim:].any():
            raise _fail(path, f"dim={dim} asked for, but the points have non-zero coordinates beyond the first {dim}")
        if dim > points.shape[1]:
            raise _fail(path, f"dim={dim} asked for, but the file has {points.shape[1]} coordinates per point")
        points = points[:, :dim]
    return np.ascontiguousarray(points), MeshInfo(_ext(path), points.shape[1], cells=cells)


def read_points(path, *, dim: int | None = None) -> tuple[np.ndarray, MeshInfo]:
    """Reads a point cloud: returns (points (N, D) float64 array, MeshInfo).

    Args:
        path: a .npy, .txt / .csv / .xyz, or mesh (.ply .obj .vtk .off .stl) file.
        dim: for meshes only, the number of coordinates to keep (2 drops a z that must be all zero);
            by default a mesh whose z is zero everywhere is read as 2-D.

    Raises:
        PointFileError: the file is missing, unreadable, malformed, empty, or holds NaN / Inf.
    """
    path = Path(path)
    ext = _ext(path)
    if ext not in EXTENSIONS:
        raise _fail(path, f"unknown extension {ext or '(none)'!r}; supported: {', '.join(EXTENSIONS)}")
    if not path.exists():
        raise _fail(path, "no such file")
    if path.is_dir():
        raise _fail(path, "it is a directory")
    if path.stat().st_size == 0:
        raise _fail(path, "the file is empty (0 bytes)")
    try:
        if ext == ".npy":
            return _read_npy(path)
        if ext in TEXT_EXTENSIONS:
            return _read_text(path)
        return _read_mesh(path, dim)
    except PermissionError:
        raise _fail(path, "permission denied") from None


# -- writing ----------------------------------------------------------------------------------------

def _write_text(path: Path, points: np.ndarray, like: MeshInfo | None) -> None:
    delimiter = "," if _ext(path) == ".csv" else " "
    header = None
    if like is not None and like.header is not None and like.format in TEXT_EXTENSIONS and like.dim == points.shape[1]:
        header = like.header
    elif _ext(path) == ".csv":
        header = ",".join("xyzw"[k] if points.shape[1] <= 4 else f"x{k}" for k in range(points.shape[1]))
    buf = _io.StringIO()
    if header is not None:
        buf.write(header + "\n")
    np.savetxt(buf, points, fmt="%.17g", delimiter=delimiter)  # %.17g: exact float64 round trip
    with atomic_write(path) as tmp:
        tmp.write_text(buf.getvalue(), encoding="utf-8")


def _write_mesh(path: Path, points: np.ndarray, like: MeshInfo | None) -> None:
    meshio = _import_meshio(path, "write")
    if points.shape[1] > 3:
        raise PointFileError(f"cannot write {str(path)!r}: mesh formats hold at most 3 coordinates, got {points.shape[1]}")
    if points.shape[1] < 3:  # mesh formats want x, y, z
        points = np.concatenate([points, np.zeros((points.shape[0], 3 - points.shape[1]))], axis=1)
    cells = list(like.cells) if like is not None else []
    for kind, data in cells:
        if data.size and data.max() >= points.shape[0]:
            raise PointFileError(f"cannot write {str(path)!r}: the {kind} cells of `like` refer to vertex "
                                 f"{int(data.max())}, but only {points.shape[0]} points are given")
    ext = _ext(path)
    if ext == ".stl" and not any(kind == "triangle" for kind, _ in cells):
        raise PointFileError(f"cannot write {str(path)!r}: STL stores triangles only and these points have "
                             f"none (pass like= the info of a triangle mesh, or write .ply / .npy)")
    if not cells and ext == ".vtk":  # legacy VTK needs cells: one vertex cell per point
        cells = [("vertex", np.arange(points.shape[0], dtype=np.int64)[:, None])]
    if ext == ".stl":
        cells = [(kind, data) for kind, data in cells if kind == "triangle"]
    with atomic_write(path) as tmp, _quiet_meshio():
        try:
            meshio.write(str(tmp), meshio.Mesh(points, cells), file_format=_MESHIO_FORMATS[ext])
        except (Exception, SystemExit) as err:
            raise PointFileError(f"cannot write {str(path)!r}: {_short(err)}") from None



def write_points(path, points, *, like: MeshInfo | None = None) -> None:
    """Writes points (N, D) to ``path`` in the format of its extension, atomically.

    Args:
        path: destination (.npy, .txt, .csv, .xyz, .ply, .obj, .vtk, .off, .stl).
        points: (N, D) numpy array or torch tensor.
        like: the MeshInfo of the file these points came from: a mesh keeps its cells (faces),
            a text file its header line.
    """
    path = Path(path)
    if hasattr(points, "detach"):  # torch tensor, without importing torch here
        points = points.detach().cpu().numpy()
    points = _check_cloud(np.asarray(points), path, reading=False)
    if like is not None and not isinstance(like, MeshInfo):
        raise TypeError(f"like must be the MeshInfo returned by read_points, got {type(like).__name__}")
    ext = _ext(path)
    if ext not in EXTENSIONS:
        raise PointFileError(f"cannot write {str(path)!r}: unknown extension {ext or '(none)'!r}; "
                             f"supported: {', '.join(EXTENSIONS)}")
    if ext == ".npy":
        with atomic_write(path) as tmp:
            np.save(tmp, points, allow_pickle=False)
    elif ext in TEXT_EXTENSIONS:
        _write_text(path, points, like)
    else:
        _write_mesh(path, points, like)
