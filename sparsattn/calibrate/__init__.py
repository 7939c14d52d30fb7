"""calibrate: model-level fitting of methods, above ``methods/`` (it drives whole models).

A method file (``sparsattn/methods/*.py``) holds the method and the small file it loads; the code
that runs a whole model to produce that file lives here, so ``methods/`` never imports
``integrations`` or ``train``. ``sparsattn.calibrate.moa``: MoA's gradient profiling and span plan
(``fit_moa``).
"""
