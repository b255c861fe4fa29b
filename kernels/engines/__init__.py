"""The two chunkwise engines every op family rides on, and what they share.

- ``gated``: S_t = Diag(exp(g_t)) S_{t-1} + k_t^T v_t, for no decay, a decay per head or
  one per key channel (``linear_attn``, ``simple_gla``, ``gla``).
- ``delta``: the (gated) delta rule, S_t = exp(g_t) (I - beta_t k_t^T k_t) S_{t-1} +
  beta_t k_t^T v_t (``delta_rule``, ``gated_delta_rule``, ``gated_deltaproduct``).

Each engine folder holds its call facade and LASP-2 protocol (``__init__``), its oracle
(``naive``), its torch chunkwise path (``chunk_torch``) and its Triton kernels
(``chunk_triton``). Shared here: the one autograd pattern (``autograd``), the oracles'
driver (``oracle``), the Triton pieces both engines use (``triton_blocks``) and the one
fused recurrent kernel for decoding (``recurrent_triton``). docs/architecture.md, "Op
families as units".
"""
