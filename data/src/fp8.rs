//! float8 e4m3fn with one scale per row: how `forge prepare-hidden --dtype fp8` stores hidden
//! states (the granularity of speculators' FP8 hidden-states connector, see docs/data.md).
//!
//! e4m3fn (the OCP FP8 format torch calls `float8_e4m3fn`, safetensors `F8_E4M3`): 1 sign
//! bit, 4 exponent bits (bias 7), 3 mantissa bits; no infinities, one NaN pattern per sign
//! (`S.1111.111`); largest finite value 448, smallest normal 2^-6, subnormals the multiples
//! of 2^-9 below it.
//!
//! A row `x` is stored as `scale = max(amax(|x|) / 448, 1e-12)` (f32) and the codes
//! `e4m3(x_i / scale)`; it reads back as `e4m3_to_f32(code) * scale`. Rounding is to nearest,
//! ties to even, and values past ±448 saturate to ±448, as libtorch 2.13's CPU cast does
//! (`x / scale` stays within ±448 anyway).
//!
//! Error of one element (derivation in docs/data.md): with `y = x / scale`, `|y| <= 448`;
//! a normal `y` is off by at most half a step of its binade, `2^-4 |y|`, a subnormal one by at
//! most `2^-10`, so `|x - x̂| <= 2^-4 |x| + 2^-10 scale` (plus f32 rounding of the division
//! and product, ~2^-23 |x|).

use crate::error::{DataError, Result};
use std::sync::OnceLock;

/// Largest finite e4m3fn value.
pub const E4M3_MAX: f32 = 448.0;
/// Smallest scale of a row (an all-zero row), as speculators clamps it.
pub const MIN_SCALE: f32 = 1e-12;
/// The code of +448 (`0.1111.110`).
const MAX_CODE: u8 = 0x7e;
/// The NaN code (`0.1111.111`; with the sign bit set, -NaN).
const NAN_CODE: u8 = 0x7f;
/// 2^-6, the smallest normal value.
const MIN_NORMAL: f32 = 0.015625;

/// One f32 to e4m3fn: round to nearest even, saturating to ±448 (±inf too); NaN stays NaN.
pub fn f32_to_e4m3(x: f32) -> u8 {
    let sign = if x.is_sign_negative() { 0x80 } else { 0 };
    if x.is_nan() {
        return sign | NAN_CODE;
    }
    let a = x.abs();
    if a >= E4M3_MAX {
        return sign | MAX_CODE;
    }
    if a < MIN_NORMAL {
        // zero and subnormals: the multiples of 2^-9 (`a * 512` is exact); 8 rounds up to the
        // smallest normal, whose code is 8 too
        return sign | (a * 512.0).round_ties_even() as u8;
    }
    let bits = a.to_bits();
    let exp = (bits >> 23) as i32 - 127; // -6..=8 here
    let mant = bits & 0x7f_ffff;
    let keep = mant >> 20; // the 3 mantissa bits kept
    let rest = mant & 0xf_ffff; // the 20 dropped
    let half = 0x8_0000;
    let mut code = (((exp + 7) as u32) << 3) | keep;
    if rest > half || (rest == half && keep & 1 == 1) {
        code += 1; // a carry into the exponent is the next binade's first value
    }
    sign | code.min(MAX_CODE as u32) as u8
}

fn table() -> &'static [f32; 256] {
    static TABLE: OnceLock<[f32; 256]> = OnceLock::new();
    TABLE.get_or_init(|| {
        let mut t = [0f32; 256];
        for (c, v) in t.iter_mut().enumerate() {
            let (e, m) = ((c >> 3) & 0xf, c & 7);
            let a = if e == 0xf && m == 7 {
                f32::NAN
            } else if e == 0 {
                m as f32 / 512.0
            } else {
                // (1 + m/8) * 2^(e-7)
                (8 + m) as f32 * 2f32.powi(e as i32 - 10)
            };
            *v = if c & 0x80 != 0 { -a } else { a };
        }
        t
    })
}

/// One e4m3fn code to f32 (exact).
pub fn e4m3_to_f32(c: u8) -> f32 {
    table()[c as usize]
}

/// Quantises `values` (rows of `width`) to e4m3fn codes with one f32 scale per row,
/// `max(amax(|row|) / 448, 1e-12)`. A non-finite value is refused (fp8 has no infinity and a
/// NaN would poison its row's scale), naming `what` and the row.
pub fn quantize_rows(values: &[f32], width: usize, what: &str) -> Result<(Vec<u8>, Vec<f32>)> {
    if width == 0 || values.is_empty() {
        return Ok((Vec::new(), Vec::new()));
    }
    if !values.len().is_multiple_of(width) {
        return Err(DataError::Invalid(format!(
            "{what}: {} values are not rows of {width}",
            values.len()
        )));
    }
    let mut codes = Vec::with_capacity(values.len());
    let mut scales = Vec::with_capacity(values.len() / width);
    for (r, row) in values.chunks_exact(width).enumerate() {
        if let Some(x) = row.iter().find(|x| !x.is_finite()) {
            return Err(DataError::Invalid(format!(
                "{what}: row {r} holds {x}, which fp8 cannot store: store this data with --dtype bf16"
            )));
        }
        let amax = row.iter().fold(0f32, |m, &x| m.max(x.abs()));
        let scale = (amax / E4M3_MAX).max(MIN_SCALE);
        codes.extend(row.iter().map(|&x| f32_to_e4m3(x / scale)));
        scales.push(scale);
    }
    Ok((codes, scales))
}

/// The f32 values of rows of `width` e4m3fn codes with their per-row scales.
pub fn dequantize_rows(codes: &[u8], scales: &[f32], width: usize) -> Result<Vec<f32>> {
    if codes.len() != scales.len() * width {
        return Err(DataError::Invalid(format!(
            "{} fp8 values do not make {} rows of {width}",
            codes.len(),
            scales.len()
        )));
    }
    let t = table();
    let mut out = Vec::with_capacity(codes.len());
    if width > 0 {
        for (row, &s) in codes.chunks_exact(width).zip(scales) {
            out.extend(row.iter().map(|&c| t[c as usize] * s));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fp8_known_values_round_to_nearest_even_and_saturate() {
        let cases: &[(f32, u8)] = &[
            (0.0, 0x00),
            (-0.0, 0x80),
            (1.0, 0x38),
            (-1.0, 0xb8),
            (1.125, 0x39),
            (1.0625, 0x38), // tie between 1 and 1.125: even mantissa (0)
            (1.1875, 0x3a), // tie between 1.125 and 1.25: even mantissa (2)
            (1.18, 0x39),   // below the tie
            (1.19, 0x3a),   // above it
            (1.9375, 0x40), // tie between 1.875 and 2: carries into the exponent
            (240.0, 0x77),  // 1.875 * 2^7
            (448.0, 0x7e),  // the largest finite value
            (447.0, 0x7e),  // rounds to it
            (416.0, 0x7d),  // 1.625 * 2^8
            (400.0, 0x7c),  // tie between 384 (0x7c) and 416 (0x7d): even
            (464.0, 0x7e),  // would round to 480: saturates
            (1.0e6, 0x7e),  // saturates
            (-1.0e6, 0xfe), // saturates, negative
            (f32::INFINITY, 0x7e),
            (f32::NEG_INFINITY, 0xfe),
            (0.015625, 0x08),     // 2^-6, the smallest normal
            (0.001953125, 0x01),  // 2^-9, the smallest subnormal
            (0.0009765625, 0x00), // 2^-10: tie between 0 and 2^-9, even (0)
            (0.0029296875, 0x02), // 1.5 * 2^-9: tie, even (2)
            (0.0146484375, 0x08), // 7.5 * 2^-9: tie between 7 and 8 -> 8, the smallest normal
            (-0.005859375, 0x83), // -3 * 2^-9
            (1.0e-8, 0x00),       // underflows to zero
        ];
        for &(x, want) in cases {
            assert_eq!(
                f32_to_e4m3(x),
                want,
                "{x}: got {:#04x}, want {want:#04x}",
                f32_to_e4m3(x)
            );
        }
        assert_eq!(f32_to_e4m3(f32::NAN), 0x7f);
        assert!(e4m3_to_f32(0x7f).is_nan() && e4m3_to_f32(0xff).is_nan());
        assert_eq!(e4m3_to_f32(0x7e), 448.0);
        assert_eq!(e4m3_to_f32(0xfe), -448.0);
        assert_eq!(e4m3_to_f32(0x01), 0.001953125);
        assert_eq!(e4m3_to_f32(0x08), 0.015625);
        assert_eq!(e4m3_to_f32(0x38), 1.0);
        assert_eq!(e4m3_to_f32(0x77), 240.0);
    }

    #[test]
    fn fp8_every_code_round_trips_and_encoding_is_monotonic() {
        for c in 0..=255u8 {
            if c & 0x7f == NAN_CODE {
                continue;
            }
            assert_eq!(f32_to_e4m3(e4m3_to_f32(c)), c, "code {c:#04x}");
        }
        // between two neighbouring values, the midpoint goes to the even code, and everything
        // strictly inside goes to the nearer one
        for c in 0..MAX_CODE {
            let (lo, hi) = (e4m3_to_f32(c), e4m3_to_f32(c + 1));
            let mid = (lo + hi) / 2.0;
            let even = if c % 2 == 0 { c } else { c + 1 };
            assert_eq!(f32_to_e4m3(mid), even, "midpoint of {lo} and {hi}");
            assert_eq!(f32_to_e4m3(mid - (mid - lo) / 4.0), c);
            assert_eq!(f32_to_e4m3(mid + (hi - mid) / 4.0), c + 1);
        }
    }

    #[test]
    fn fp8_rows_keep_their_error_bound() {
        let width = 64usize;
        let mut values = Vec::new();
        for r in 0..50usize {
            let mag = 10f32.powi((r % 9) as i32 - 4); // rows from 1e-4 to 1e4
            values.extend((0..width).map(|j| ((r * 97 + j * 13) as f32 * 0.61).sin() * mag * (1.0 + j as f32)));
        }
        values[5 * width..6 * width].fill(0.0); // an all-zero row
        let (codes, scales) = quantize_rows(&values, width, "test").expect("finite");
        assert_eq!((codes.len(), scales.len()), (values.len(), 50));
        assert_eq!(scales[5], MIN_SCALE);
        let back = dequantize_rows(&codes, &scales, width).expect("rows");
        for (r, (row, got)) in values.chunks(width).zip(back.chunks(width)).enumerate() {
            let amax = row.iter().fold(0f32, |m, x| m.max(x.abs()));
            assert!(amax == 0.0 || (scales[r] - amax / 448.0).abs() <= 1e-6 * scales[r]);
            for (x, y) in row.iter().zip(got) {
                let bound = x.abs() / 16.0 + scales[r] / 1024.0 + 1e-6 * x.abs();
                assert!((x - y).abs() <= bound, "row {r}: {x} -> {y}, bound {bound}");
            }
            // the row's largest value is stored exactly (its code is ±448)
            let i = row.iter().position(|x| x.abs() == amax).expect("amax");
            assert!(
                (got[i] - row[i]).abs() <= 1e-6 * amax,
                "row {r}: amax {} -> {}",
                row[i],
                got[i]
            );
        }
        let err = quantize_rows(&[1.0, f32::NAN], 2, "sample s7 hidden_state").expect_err("nan");
        assert!(err.to_string().contains("sample s7 hidden_state: row 0"), "{err}");
        assert!(quantize_rows(&[1.0, 2.0, 3.0], 2, "x").is_err());
        assert!(dequantize_rows(&[1, 2, 3], &[1.0], 2).is_err());
    }
}
