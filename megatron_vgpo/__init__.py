"""megatron_vgpo: VGPO reinforcement learning of Qwen2.5-VL on Megatron-Core."""

# Must run before anything imports torchvision (CUDA torchvision wheel next to a CPU torch);
# cheap: it only registers an import hook. See megatron_vgpo/utils/torchvision_shim.py.
from megatron_vgpo.utils.torchvision_shim import install as _install_torchvision_shim

_install_torchvision_shim()
