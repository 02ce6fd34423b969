"""Zero-shot evaluations of SOAP heads (SPEC §5), raw vs SOAP on the same images.

Modules, from the bottom up:

* :mod:`~soapflow.evaluation.tokencut` — normalized cut on patch tokens, soft maps, the fast
  bilateral solver refinement;
* :mod:`~soapflow.evaluation.metrics` — max Fβ (β² = 0.3), IoU, pixel accuracy, confusion/mIoU;
* :mod:`~soapflow.evaluation.knn` — cosine kNN with majority vote, patch labels;
* :mod:`~soapflow.evaluation.stats` — paired bootstrap CIs over images, improved/worsened counts;
* :mod:`~soapflow.evaluation.datasets` — fashion-mnist and folder layouts (ECSSD, DUTS-TE, DUT-OMRON …);
* :mod:`~soapflow.evaluation.tokens` — one-pass multi-layer token extraction with a disk cache;
* :mod:`~soapflow.evaluation.protocols` — the three protocols on token arrays;
* :mod:`~soapflow.evaluation.run` — a head in, a report out (used by ``soap eval`` and the flow);
* :mod:`~soapflow.evaluation.report` — JSON reports, tables, PNG grids;
* :mod:`~soapflow.evaluation.scan` — per-layer SI and evaluations (``soap scan``).
"""
