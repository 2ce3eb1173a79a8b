//! f32 vectors for the CPU kernels: AVX-512 (16 lanes) or AVX2+FMA (8 lanes) where the CPU has
//! them (checked at run time), else a portable `[f32; 8]` that the compiler lowers to SSE.
//! Kernels are written once, generic over [`Simd`], `#[inline(always)]`, and instantiated inside
//! a `#[target_feature]` function per level by [`dispatch!`].

use std::sync::atomic::{AtomicU8, Ordering};

/// Lanes of the portable and AVX2 vectors.
pub(crate) const LANES: usize = 8;

/// One vector type and its operations. Pointers must be valid for the lanes they touch.
pub(crate) trait Simd: Copy {
    type V: Copy;
    /// f32 lanes per vector.
    const LANES: usize;
    /// Output pixels per register block of the conv kernels (2 x `PIX` accumulators: 12 of the
    /// 16 AVX2 registers, 24 of the 32 AVX-512 ones).
    const PIX: usize;
    unsafe fn zero() -> Self::V;
    unsafe fn splat(x: f32) -> Self::V;
    unsafe fn load(p: *const f32) -> Self::V;
    unsafe fn store(p: *mut f32, v: Self::V);
    /// First `n < 8` lanes from `p`, the rest zero.
    unsafe fn load_part(p: *const f32, n: usize) -> Self::V;
    /// Stores the first `n < 8` lanes.
    unsafe fn store_part(p: *mut f32, v: Self::V, n: usize);
    /// `a * b + c` (fused where the hardware has FMA).
    unsafe fn fma(a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    unsafe fn add(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn sub(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn mul(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn div(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn max(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn min(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn sqrt(a: Self::V) -> Self::V;
    /// Sum of the lanes.
    unsafe fn hsum(a: Self::V) -> f32;
    /// Largest lane.
    unsafe fn hmax(a: Self::V) -> f32;
    /// `2^n` for integer-valued `n` in [-126, 127].
    unsafe fn pow2i(n: Self::V) -> Self::V;
    /// Round to nearest integer (ties to even).
    unsafe fn round(a: Self::V) -> Self::V;

    /// `exp(x)`, within 2 ulp of libm on [-87, 88]; saturates to 0 / large outside.
    #[inline(always)]
    unsafe fn exp(x: Self::V) -> Self::V {
        // Cephes expf: x = n ln2 + r, |r| <= ln2/2, exp(r) by a degree-6 polynomial.
        let x = Self::min(Self::max(x, Self::splat(-87.3)), Self::splat(88.3));
        let n = Self::round(Self::mul(x, Self::splat(std::f32::consts::LOG2_E)));
        let r = Self::fma(n, Self::splat(-0.693_359_4), x);
        let r = Self::fma(n, Self::splat(2.121_944_4e-4), r);
        let mut p = Self::splat(1.987_569_1e-4);
        p = Self::fma(p, r, Self::splat(1.398_199_9e-3));
        p = Self::fma(p, r, Self::splat(8.333_452e-3));
        p = Self::fma(p, r, Self::splat(4.166_579_6e-2));
        p = Self::fma(p, r, Self::splat(1.666_666_5e-1));
        p = Self::fma(p, r, Self::splat(0.5));
        let r2 = Self::mul(r, r);
        let e = Self::add(Self::fma(p, r2, r), Self::splat(1.0));
        Self::mul(e, Self::pow2i(n))
    }

    /// `1 / (1 + exp(-x))`.
    #[inline(always)]
    unsafe fn sigmoid(x: Self::V) -> Self::V {
        let one = Self::splat(1.0);
        Self::div(one, Self::add(one, Self::exp(Self::sub(Self::zero(), x))))
    }
}

/// Portable fallback: plain arrays (SSE2 after auto-vectorisation).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Scalar;

macro_rules! lanewise {
    ($a:expr, $b:expr, $f:expr) => {{
        let mut o = [0f32; LANES];
        for i in 0..LANES {
            o[i] = $f($a[i], $b[i]);
        }
        o
    }};
}

impl Simd for Scalar {
    type V = [f32; LANES];
    const LANES: usize = LANES;
    const PIX: usize = 6;
    #[inline(always)]
    unsafe fn zero() -> Self::V {
        [0.0; LANES]
    }
    #[inline(always)]
    unsafe fn splat(x: f32) -> Self::V {
        [x; LANES]
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self::V {
        std::ptr::read_unaligned(p as *const [f32; LANES])
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: Self::V) {
        std::ptr::write_unaligned(p as *mut [f32; LANES], v)
    }
    #[inline(always)]
    unsafe fn load_part(p: *const f32, n: usize) -> Self::V {
        let mut o = [0.0; LANES];
        for (i, o) in o.iter_mut().enumerate().take(n) {
            *o = *p.add(i);
        }
        o
    }
    #[inline(always)]
    unsafe fn store_part(p: *mut f32, v: Self::V, n: usize) {
        for (i, v) in v.iter().enumerate().take(n) {
            *p.add(i) = *v;
        }
    }
    #[inline(always)]
    unsafe fn fma(a: Self::V, b: Self::V, c: Self::V) -> Self::V {
        let mut o = [0f32; LANES];
        for i in 0..LANES {
            o[i] = a[i] * b[i] + c[i];
        }
        o
    }
    #[inline(always)]
    unsafe fn add(a: Self::V, b: Self::V) -> Self::V {
        lanewise!(a, b, |x: f32, y: f32| x + y)
    }
    #[inline(always)]
    unsafe fn sub(a: Self::V, b: Self::V) -> Self::V {
        lanewise!(a, b, |x: f32, y: f32| x - y)
    }
    #[inline(always)]
    unsafe fn mul(a: Self::V, b: Self::V) -> Self::V {
        lanewise!(a, b, |x: f32, y: f32| x * y)
    }
    #[inline(always)]
    unsafe fn div(a: Self::V, b: Self::V) -> Self::V {
        lanewise!(a, b, |x: f32, y: f32| x / y)
    }
    #[inline(always)]
    unsafe fn max(a: Self::V, b: Self::V) -> Self::V {
        lanewise!(a, b, |x: f32, y: f32| if x > y { x } else { y })
    }
    #[inline(always)]
    unsafe fn min(a: Self::V, b: Self::V) -> Self::V {
        lanewise!(a, b, |x: f32, y: f32| if x < y { x } else { y })
    }
    #[inline(always)]
    unsafe fn sqrt(a: Self::V) -> Self::V {
        a.map(f32::sqrt)
    }
    #[inline(always)]
    unsafe fn hsum(a: Self::V) -> f32 {
        // Same pairing as the AVX2 version, so both round alike.
        let h: [f32; 4] = [a[0] + a[4], a[1] + a[5], a[2] + a[6], a[3] + a[7]];
        let q = [h[0] + h[2], h[1] + h[3]];
        q[0] + q[1]
    }
    #[inline(always)]
    unsafe fn hmax(a: Self::V) -> f32 {
        a.iter().copied().fold(f32::NEG_INFINITY, f32::max)
    }
    #[inline(always)]
    unsafe fn pow2i(n: Self::V) -> Self::V {
        n.map(|v| f32::from_bits((((v as i32) + 127) as u32) << 23))
    }
    #[inline(always)]
    unsafe fn round(a: Self::V) -> Self::V {
        a.map(f32::round_ties_even)
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) use avx2::Avx2;

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{Simd, LANES};
    use std::arch::x86_64::*;

    /// AVX2 + FMA. Only used from functions compiled with those features after a run-time check.
    #[derive(Clone, Copy, Debug)]
    pub(crate) struct Avx2;

    #[inline(always)]
    unsafe fn mask(n: usize) -> __m256i {
        const M: [i32; 16] = [-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0];
        _mm256_loadu_si256(M.as_ptr().add(LANES - n) as *const __m256i)
    }

    impl Simd for Avx2 {
        type V = __m256;
        const LANES: usize = LANES;
        const PIX: usize = 6;
        #[inline(always)]
        unsafe fn zero() -> __m256 {
            _mm256_setzero_ps()
        }
        #[inline(always)]
        unsafe fn splat(x: f32) -> __m256 {
            _mm256_set1_ps(x)
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> __m256 {
            _mm256_loadu_ps(p)
        }
        #[inline(always)]
        unsafe fn store(p: *mut f32, v: __m256) {
            _mm256_storeu_ps(p, v)
        }
        #[inline(always)]
        unsafe fn load_part(p: *const f32, n: usize) -> __m256 {
            _mm256_maskload_ps(p, mask(n))
        }
        #[inline(always)]
        unsafe fn store_part(p: *mut f32, v: __m256, n: usize) {
            _mm256_maskstore_ps(p, mask(n), v)
        }
        #[inline(always)]
        unsafe fn fma(a: __m256, b: __m256, c: __m256) -> __m256 {
            _mm256_fmadd_ps(a, b, c)
        }
        #[inline(always)]
        unsafe fn add(a: __m256, b: __m256) -> __m256 {
            _mm256_add_ps(a, b)
        }
        #[inline(always)]
        unsafe fn sub(a: __m256, b: __m256) -> __m256 {
            _mm256_sub_ps(a, b)
        }
        #[inline(always)]
        unsafe fn mul(a: __m256, b: __m256) -> __m256 {
            _mm256_mul_ps(a, b)
        }
        #[inline(always)]
        unsafe fn div(a: __m256, b: __m256) -> __m256 {
            _mm256_div_ps(a, b)
        }
        #[inline(always)]
        unsafe fn max(a: __m256, b: __m256) -> __m256 {
            _mm256_max_ps(a, b)
        }
        #[inline(always)]
        unsafe fn min(a: __m256, b: __m256) -> __m256 {
            _mm256_min_ps(a, b)
        }
        #[inline(always)]
        unsafe fn sqrt(a: __m256) -> __m256 {
            _mm256_sqrt_ps(a)
        }
        #[inline(always)]
        unsafe fn hsum(a: __m256) -> f32 {
            let h = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
            let q = _mm_add_ps(h, _mm_movehl_ps(h, h));
            _mm_cvtss_f32(_mm_add_ss(q, _mm_shuffle_ps(q, q, 1)))
        }
        #[inline(always)]
        unsafe fn hmax(a: __m256) -> f32 {
            let h = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
            let q = _mm_max_ps(h, _mm_movehl_ps(h, h));
            _mm_cvtss_f32(_mm_max_ss(q, _mm_shuffle_ps(q, q, 1)))
        }
        #[inline(always)]
        unsafe fn pow2i(n: __m256) -> __m256 {
            let i = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
            _mm256_castsi256_ps(_mm256_slli_epi32(i, 23))
        }
        #[inline(always)]
        unsafe fn round(a: __m256) -> __m256 {
            _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) use avx512::Avx512;

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::Simd;
    use std::arch::x86_64::*;

    /// AVX-512F, 16 lanes. Only used from functions compiled with it after a run-time check.
    #[derive(Clone, Copy, Debug)]
    pub(crate) struct Avx512;

    #[inline(always)]
    fn mask(n: usize) -> __mmask16 {
        ((1u32 << n) - 1) as __mmask16
    }

    impl Simd for Avx512 {
        type V = __m512;
        const LANES: usize = 16;
        const PIX: usize = 12;
        #[inline(always)]
        unsafe fn zero() -> __m512 {
            _mm512_setzero_ps()
        }
        #[inline(always)]
        unsafe fn splat(x: f32) -> __m512 {
            _mm512_set1_ps(x)
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> __m512 {
            _mm512_loadu_ps(p)
        }
        #[inline(always)]
        unsafe fn store(p: *mut f32, v: __m512) {
            _mm512_storeu_ps(p, v)
        }
        #[inline(always)]
        unsafe fn load_part(p: *const f32, n: usize) -> __m512 {
            _mm512_maskz_loadu_ps(mask(n), p)
        }
        #[inline(always)]
        unsafe fn store_part(p: *mut f32, v: __m512, n: usize) {
            _mm512_mask_storeu_ps(p, mask(n), v)
        }
        #[inline(always)]
        unsafe fn fma(a: __m512, b: __m512, c: __m512) -> __m512 {
            _mm512_fmadd_ps(a, b, c)
        }
        #[inline(always)]
        unsafe fn add(a: __m512, b: __m512) -> __m512 {
            _mm512_add_ps(a, b)
        }
        #[inline(always)]
        unsafe fn sub(a: __m512, b: __m512) -> __m512 {
            _mm512_sub_ps(a, b)
        }
        #[inline(always)]
        unsafe fn mul(a: __m512, b: __m512) -> __m512 {
            _mm512_mul_ps(a, b)
        }
        #[inline(always)]
        unsafe fn div(a: __m512, b: __m512) -> __m512 {
            _mm512_div_ps(a, b)
        }
        #[inline(always)]
        unsafe fn max(a: __m512, b: __m512) -> __m512 {
            _mm512_max_ps(a, b)
        }
        #[inline(always)]
        unsafe fn min(a: __m512, b: __m512) -> __m512 {
            _mm512_min_ps(a, b)
        }
        #[inline(always)]
        unsafe fn sqrt(a: __m512) -> __m512 {
            _mm512_sqrt_ps(a)
        }
        #[inline(always)]
        unsafe fn hsum(a: __m512) -> f32 {
            _mm512_reduce_add_ps(a)
        }
        #[inline(always)]
        unsafe fn hmax(a: __m512) -> f32 {
            _mm512_reduce_max_ps(a)
        }
        #[inline(always)]
        unsafe fn pow2i(n: __m512) -> __m512 {
            let i = _mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127));
            _mm512_castsi512_ps(_mm512_slli_epi32(i, 23))
        }
        #[inline(always)]
        unsafe fn round(a: __m512) -> __m512 {
            _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
        }
    }
}

/// Which instruction set the kernels use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    Avx512,
    Avx2,
    Scalar,
}

impl Level {
    /// f32 lanes per vector.
    pub fn lanes(self) -> usize {
        match self {
            Level::Avx512 => 16,
            Level::Avx2 | Level::Scalar => LANES,
        }
    }
    /// Output pixels per register block of the conv kernels ([`Simd::PIX`]).
    pub fn pix(self) -> usize {
        match self {
            Level::Avx512 => 12,
            Level::Avx2 | Level::Scalar => 6,
        }
    }
    fn code(self) -> u8 {
        match self {
            Level::Avx512 => 1,
            Level::Avx2 => 2,
            Level::Scalar => 3,
        }
    }
}

// 0 = not decided yet, else `Level::code`.
static LEVEL: AtomicU8 = AtomicU8::new(0);

/// The instruction set in use: the best the CPU has, unless [`force`] was called or
/// `DISTILL_SIMD` is `avx2` or `scalar` (a cap, for comparisons and fallback tests).
pub fn level() -> Level {
    match LEVEL.load(Ordering::Relaxed) {
        1 => Level::Avx512,
        2 => Level::Avx2,
        3 => Level::Scalar,
        _ => {
            let l = detect();
            LEVEL.store(l.code(), Ordering::Relaxed);
            l
        }
    }
}

/// The best level of this CPU, capped by `$DISTILL_SIMD`.
pub fn detect() -> Level {
    let cap = std::env::var("DISTILL_SIMD").unwrap_or_default();
    if cap == "scalar" {
        return Level::Scalar;
    }
    #[cfg(target_arch = "x86_64")]
    {
        if cap != "avx2" && is_x86_feature_detected!("avx512f") {
            return Level::Avx512;
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            return Level::Avx2;
        }
    }
    Level::Scalar
}

/// Uses `l` from now on (process-wide; for tests and comparisons). A level the CPU lacks falls
/// back to [`detect`].
pub fn force(l: Level) {
    let best = detect();
    let ok = match l {
        Level::Scalar => true,
        Level::Avx2 => best != Level::Scalar,
        Level::Avx512 => best == Level::Avx512,
    };
    LEVEL.store(if ok { l } else { best }.code(), Ordering::Relaxed);
}

/// Defines `unsafe fn $name(level: Level, args)` that runs `$imp::<S>(args)` with the [`Simd`]
/// of `level`: `$imp` must be an `#[inline(always)] unsafe fn` generic over `S: Simd`, whose
/// safety requirements the caller of `$name` upholds. The level is an argument so that a whole
/// kernel (whose plan depends on the lane count) uses one level even if [`force`] is called.
macro_rules! dispatch {
    ($(#[$m:meta])* $vis:vis unsafe fn $name:ident($($a:ident: $t:ty),* $(,)?) $(-> $r:ty)? => $imp:ident) => {
        $(#[$m])*
        #[allow(clippy::too_many_arguments)]
        $vis unsafe fn $name(level: $crate::kernels::simd::Level, $($a: $t),*) $(-> $r)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn avx512($($a: $t),*) $(-> $r)? {
                    $imp::<$crate::kernels::simd::Avx512>($($a),*)
                }
                #[target_feature(enable = "avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn avx2($($a: $t),*) $(-> $r)? {
                    $imp::<$crate::kernels::simd::Avx2>($($a),*)
                }
                match level {
                    $crate::kernels::simd::Level::Avx512 => return avx512($($a),*),
                    $crate::kernels::simd::Level::Avx2 => return avx2($($a),*),
                    $crate::kernels::simd::Level::Scalar => {}
                }
            }
            let _ = level;
            $imp::<$crate::kernels::simd::Scalar>($($a),*)
        }
    };
}
pub(crate) use dispatch;

#[cfg(test)]
mod tests {
    use super::*;

    unsafe fn exp_of<S: Simd>(x: f32) -> f32 {
        let mut o = [0f32; 16];
        S::store(o.as_mut_ptr(), S::exp(S::splat(x)));
        o[0]
    }

    dispatch!(unsafe fn exp_at(x: f32) -> f32 => exp_of);

    #[test]
    fn exp_is_close_to_libm() {
        let best = detect();
        for lv in [Level::Scalar, Level::Avx2, Level::Avx512] {
            if lv.lanes() > best.lanes() || (lv != Level::Scalar && best == Level::Scalar) {
                continue;
            }
            for i in -8700..8800 {
                let x = i as f32 * 0.01;
                let want = x.exp();
                let got = unsafe { exp_at(lv, x) };
                assert!(
                    (got - want).abs() <= 3e-7 * want,
                    "{lv:?}: exp({x}) = {got}, libm {want}"
                );
            }
        }
    }

    #[test]
    fn partial_loads_and_stores_touch_only_their_lanes() {
        let src: Vec<f32> = (1..=8).map(|v| v as f32).collect();
        for n in 1..LANES {
            let mut dst = [-1f32; LANES];
            unsafe {
                let v = Scalar::load_part(src.as_ptr(), n);
                Scalar::store_part(dst.as_mut_ptr(), v, n);
            }
            for (i, d) in dst.iter().enumerate() {
                assert_eq!(*d, if i < n { src[i] } else { -1.0 });
            }
        }
    }
}
