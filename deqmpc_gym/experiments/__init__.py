"""End-to-end experiments built on the library: the paper's Table 1, the warm-start ablation and the demo."""
