"""Relative RMS error of Winograd convolutions whose transformed tiles and weights are rounded
to bf16 (products summed exactly, as the bf16 kernels sum them in f32), against the exact 3x3
convolution, for several Toom-Cook interpolation points and tile sizes. The question behind it
(docs/BENCHMARKS.md, 2026-12-07 session 23): can other points make F(4x4, 3x3) in bf16 accurate
enough to train with? Needs numpy only:

    python3 scripts/winograd_bf16_error.py

F(m, 3) with the points p_0..p_{m+1} and infinity: A[j][i] = p_j^i, G[j][k] = p_j^k (the
infinity row picks the highest coefficient), and B^T solved from the bilinear identity
sum_j A[j][i] G[j][k] B^T[j][l] = [l == i + k] (Lavin & Gray 2016, section 4; Barabasz et al.
2020 for the error's dependence on the points). Inputs are N(0, 1) shifted by 0.5 (activations
after SiLU have a positive mean), 128 input channels, weights N(0, 1 / (9 * 128)).
"""

import numpy as np

rng = np.random.default_rng(0)


def bf16(x):
    """x rounded to bf16 (to nearest, ties to even), back as float64."""
    b = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
    return b.astype(np.uint32).view(np.float32).astype(np.float64)


def matrices(points, m, r=3):
    """A [n, m], G [n, r] and B^T [n, n] of F(m, r) on the finite `points` and infinity."""
    n = m + r - 1
    assert len(points) == n - 1
    a, g = np.zeros((n, m)), np.zeros((n, r))
    for j, p in enumerate(points):
        a[j] = [p**i for i in range(m)]
        g[j] = [p**k for k in range(r)]
    a[n - 1, m - 1] = g[n - 1, r - 1] = 1
    rows, rhs = [], []
    for i in range(m):
        for k in range(r):
            for l in range(n):
                row = np.zeros((n, n))
                row[:, l] = a[:, i] * g[:, k]
                rows.append(row.ravel())
                rhs.append(1.0 if l == i + k else 0.0)
    bt = np.linalg.lstsq(np.array(rows), np.array(rhs), rcond=None)[0].reshape(n, n)
    d, w = rng.standard_normal(n), rng.standard_normal(r)
    y = a.T @ ((g @ w) * (bt @ d))
    assert np.allclose(y, [d[i : i + r] @ w for i in range(m)]), "not a convolution"
    return a, g, bt


def error(points, m, round_u=True, round_v=True, c_in=128, tiles=300, mean=0.5):
    """Relative RMS error of 2-D F(m x m, 3 x 3) with bf16-rounded U = G w G^T and/or
    V = B^T d B, over `tiles` tiles and 8 output channels."""
    a, g, bt = matrices(points, m)
    n = a.shape[0]
    d = rng.standard_normal((tiles, c_in, n, n)) + mean
    w = rng.standard_normal((8, c_in, 3, 3)) / np.sqrt(9 * c_in)
    v = np.einsum("ij,tcjk,lk->tcil", bt, d, bt)
    u = np.einsum("ij,ocjk,lk->ocil", g, w, g)
    prod = np.einsum(
        "tcil,ocil->toil", bf16(v) if round_v else v, bf16(u) if round_u else u
    )
    y = np.einsum("ij,toil,lk->tojk", a, prod, a)
    exact = np.zeros_like(y)
    for i in range(m):
        for j in range(m):
            exact[:, :, i, j] = np.einsum("tcij,ocij->to", d[:, :, i : i + 3, j : j + 3], w)
    return np.sqrt(np.mean((y - exact) ** 2) / np.mean(exact**2))


def direct_error(c_in=128, tiles=300, mean=0.5):
    """The same for the direct product of bf16-rounded inputs and weights."""
    d = rng.standard_normal((tiles, c_in, 3, 3)) + mean
    w = rng.standard_normal((8, c_in, 3, 3)) / np.sqrt(9 * c_in)
    exact = np.einsum("tcij,ocij->to", d, w)
    y = np.einsum("tcij,ocij->to", bf16(d), bf16(w))
    return np.sqrt(np.mean((y - exact) ** 2) / np.mean(exact**2))


def main():
    print(f"direct bf16 product: {direct_error():.2e}")
    print("algorithm  points (and infinity)      both rounded  U exact   V exact")
    for m, points in [
        (2, [0, 1, -1]),
        (3, [0, 1, -1, 2]),
        (3, [0, 1, -1, 0.5]),
        (4, [0, 1, -1, 2, -2]),
        (4, [0, 1, -1, 0.5, -0.5]),
        (4, [0, 1, -1, 0.5, -2]),
        (4, [0, 1, -1, 2, -0.5]),
        (4, [0, 1, -1, 0.5, 2]),
        (4, [0, 1, -1, 0.75, -0.75]),
    ]:
        both = error(points, m)
        u_exact = error(points, m, round_u=False)
        v_exact = error(points, m, round_v=False)
        name = ", ".join(f"{p:g}" for p in points)
        print(f"F({m}x{m}, 3x3) {name:26s} {both:.2e}      {u_exact:.2e}  {v_exact:.2e}")


if __name__ == "__main__":
    main()
