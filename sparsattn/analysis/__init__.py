"""analysis: measurements that tell which method to pick and how to set it (METHODS.md section D).

One module per analysis, each with ``analyze(...) -> Report`` (JSON + CSV + PNG, a printed table):
``retrieval_heads`` (arXiv 2404.15574), ``sinks`` (ACT, arXiv 2406.15765), ``activations`` (Lazy
Neuron, arXiv 2210.06313; Sparsing Law PPL-p%, arXiv 2411.02335), ``core_neurons`` (CoreInfer,
arXiv 2410.18311), ``patterns`` (CAB, arXiv 2210.07661); ``fit_methods`` turns retrieval-head
scores into a razor calibration and a masformer layer plan. Command: ``sparsattn analyze <what>``.
"""
