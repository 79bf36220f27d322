"""The analysis model: shared-memory bank conflicts without a GPU (:mod:`.banks`), applied to each
kernel design's instructions with the index maps the kernels are compiled with (:mod:`.smem_predict`)."""
