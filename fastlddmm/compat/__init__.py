"""Drop-in entry points for code written against GeomLoss and pytorch3d: change one import line.

    from fastlddmm.compat import SamplesLoss                     # was: from geomloss import SamplesLoss
    from fastlddmm.compat import chamfer_distance, knn_points    # was: from pytorch3d.loss / pytorch3d.ops

Same signatures, call forms, return types and values; options that fastlddmm does not reproduce
raise an error naming them. The conventions followed are listed in fastlddmm.compat.geomloss and
fastlddmm.compat.pytorch3d (which also reads pytorch3d Pointclouds objects, without importing pytorch3d);
SamplesLoss("hausdorff"), which GeomLoss documents but cannot run, is defined in fastlddmm.compat.hausdorff.
"""

from .geomloss import SamplesLoss
from .pytorch3d import KNN, chamfer_distance, knn_gather, knn_points

__all__ = ["KNN", "SamplesLoss", "chamfer_distance", "knn_gather", "knn_points"]
