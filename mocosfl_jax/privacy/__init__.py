"""Privacy of the client slice: image similarity, the inversion decoder, the attack.

`similarity` (SSIM, PSNR, MSE as the reference measures them) and `decoder` (the attacker's
model) are building blocks; the simulated attacker inside TAResSFL training lives in
algorithm/ressfl.py, and the model-inversion attack on a trained run in privacy/attack.py.
"""
