"""``medssl suggest``: which unlabeled volumes to annotate next (active learning).

Every volume under a datalist key (``unlabeled`` by default) is segmented on the model grid through the
:class:`~medssl.inference.Predictor`'s sliding window (its memory bound, precision and the checkpoint's
preprocessing) and scored by one strategy; higher means "label this one first":

* ``entropy``: mean normalised predictive entropy ``H(p) / log C`` of the softmax over the *foreground-probable
  region*, the voxels with ``1 - p(background) >= foreground_threshold`` (0.1). The whole-volume mean would be
  dominated by confidently-background air and table, so a scan with a larger field of view would look more
  certain; a volume with no foreground-probable voxel scores 0.
* ``mc_dropout``: ``samples`` stochastic passes with the dropout layers in train mode (everything else, e.g.
  BatchNorm, in eval mode); the score is the mean mutual information ``H(mean_t p_t) - mean_t H(p_t)`` (BALD,
  Houlsby et al. 2011, normalised by ``log C``) over the foreground-probable region of the mean softmax: the part
  of the uncertainty that more labels can remove. A network without active dropout is refused. It holds a
  float32 ``C``-channel sum on the model grid beside the Predictor's float16 map (not in its memory estimate).
* ``teacher_student``: mean ``KL(p_teacher || p_student)`` (nats) over the union of both foreground-probable
  regions, the student being ``--model`` and the teacher a Mean Teacher's EMA network. KL rather than
  ``1 - Dice`` of the two argmaxes: it is continuous, so volumes whose labels agree but whose confidence differs
  still rank, and it needs no class to be present; the teacher is the reference because it is the target the
  student was trained towards.
* ``random``: a seeded uniform draw per volume, the control; no network runs.

Diversity (:func:`select`): greedy selection of ``diversity-adjusted score = score / max score - diversity *
max similarity to the volumes already chosen``. The similarity is computed from a descriptor of the
*prediction*, not from encoder features (medssl's networks have no common encoder interface): the softmax
average-pooled to a ``4 × 4 × 4`` grid per class (class volumes and their coarse layout), compared by an RBF kernel
``exp(-d² / median d²)`` so that identical volumes have similarity 1 and a typical pair ``exp(-1)``. ``random``
uses no descriptor: the control stays a pure random draw.

Scores are cached per volume in ``out/.suggest_cache`` keyed by the model (and teacher) file hash, the strategy
and its settings and the image file's path, size and time, so an interrupted run resumes where it stopped.

Modules: :mod:`~medssl.suggest.uncertainty` (voxel-wise maps, descriptor), :mod:`~medssl.suggest.scoring`
(:func:`score_volumes`, cache), :mod:`~medssl.suggest.selection` (:func:`select`), :mod:`~medssl.suggest.outputs`
(CSV, PNG, datalist copy, :func:`suggest`).

Example::

    scores = score_volumes("runs/mt/model_student.pt", records, "teacher_student", teacher="runs/mt/last.pt")
    chosen = select(scores, count=4, diversity=0.5)
"""

from medssl.suggest.outputs import CACHE_DIR, TO_LABEL_KEY, plot_suggestions, suggest, write_label_datalist
from medssl.suggest.scoring import STRATEGIES, Score, load_teacher_state, score_volumes
from medssl.suggest.selection import Suggestion, select, similarity_matrix
from medssl.suggest.uncertainty import FOREGROUND_THRESHOLD, active_dropout, normalised_entropy

__all__ = [
    "STRATEGIES",
    "FOREGROUND_THRESHOLD",
    "TO_LABEL_KEY",
    "CACHE_DIR",
    "Score",
    "Suggestion",
    "active_dropout",
    "load_teacher_state",
    "normalised_entropy",
    "score_volumes",
    "select",
    "similarity_matrix",
    "write_label_datalist",
    "plot_suggestions",
    "suggest",
]
