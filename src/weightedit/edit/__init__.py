"""The edit: which tensors write to the residual stream (``arch``), the projection (``projection``), the
direction file it takes (``direction_file``) and the streaming rewrite of a checkpoint (``rewrite``, ``writer``).

Nothing here runs a model: the edit works on headers and bytes, with no GPU and no transformers.
"""
