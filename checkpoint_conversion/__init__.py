"""HF <-> Megatron checkpoint conversion scripts (thin CLIs over ``megatron_vgpo.checkpoint.convert``)."""
