"""lowbit.kernels: Triton kernels. Each module names the reference function (lowbit.quant / the capability's
functional module) that its kernels must equal; import the submodule you need (Triton is optional)."""
