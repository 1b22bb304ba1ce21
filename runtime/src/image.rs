//! Image input exactly as MoE-LLaVA prepares it (spec §5.1, `process_images` with aspect "pad"):
//! decode → RGB (Pillow `convert('RGB')`: alpha dropped, palette and grey expanded; EXIF orientation
//! ignored, as the reference does) → pad to a square with the mean colour (`expand2square`) → Pillow's
//! BICUBIC resize, reproduced bit for bit → centre crop → rescale 1/255 and normalise in float32 → CHW.
//!
//! The resize is Pillow's `ImagingResample` for 8-bit images: separable, horizontal pass into an 8-bit
//! intermediate then vertical pass; per output pixel a window of taps `cubic((j + xmin − center + ½)/fs)`
//! (a = −0.5, support 2·fs, fs = max(in/out, 1)), normalised, turned into 22-bit fixed point
//! (`trunc(w·2²² ± ½)`), summed from `2²¹` and shifted right by 22 with clipping to 0..255.

use std::path::Path;

use crate::error::{Result, RuntimeError};

/// Decoded images larger than this are refused (Pillow warns at 89 M pixels and refuses at twice that).
pub const MAX_PIXELS: u64 = 178_956_970;
const MAX_SIDE: u32 = 65_535;

/// An 8-bit RGB image, row-major, interleaved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rgb8 {
    pub width: usize,
    pub height: usize,
    pub data: Vec<u8>,
}

impl Rgb8 {
    pub fn new(width: usize, height: usize, fill: [u8; 3]) -> Rgb8 {
        Rgb8 { width, height, data: fill.iter().copied().cycle().take(width * height * 3).collect() }
    }

    fn px(&self, x: usize, y: usize) -> &[u8] {
        &self.data[(y * self.width + x) * 3..(y * self.width + x) * 3 + 3]
    }
}

/// Decodes JPEG, PNG, WebP, BMP or GIF (first frame) bytes; corrupt data, unknown formats and images
/// above [`MAX_PIXELS`] are errors.
pub fn decode(bytes: &[u8], what: &str) -> Result<Rgb8> {
    decode_limited(bytes, what, MAX_PIXELS)
}

/// [`decode`] with a lower pixel limit (the server's `--max-image-pixels`), checked from the header
/// before any pixel is decoded.
pub fn decode_limited(bytes: &[u8], what: &str, max_pixels: u64) -> Result<Rgb8> {
    let max_pixels = max_pixels.min(MAX_PIXELS);
    let err = |e: &dyn std::fmt::Display| RuntimeError::Image(format!("{what}: {e}"));
    let reader = || image::ImageReader::new(std::io::Cursor::new(bytes)).with_guessed_format().map_err(|e| err(&e));
    if reader()?.format().is_none() {
        return Err(RuntimeError::Image(format!("{what}: not a JPEG, PNG, WebP, BMP or GIF image")));
    }
    // The header alone first, so that a huge declared size is refused before any pixel is decoded.
    let (w, h) = reader()?.into_dimensions().map_err(|e| err(&e))?;
    if (w as u64) * (h as u64) > max_pixels || w > MAX_SIDE || h > MAX_SIDE {
        return Err(RuntimeError::Image(format!(
            "{what}: {w}×{h} pixels exceeds the {max_pixels}-pixel limit (at most {MAX_SIDE} per side)"
        )));
    }
    let mut r = reader()?;
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_SIDE);
    limits.max_image_height = Some(MAX_SIDE);
    limits.max_alloc = Some(MAX_PIXELS * 4);
    r.limits(limits);
    let img = r.decode().map_err(|e| err(&e))?;
    if img.width() == 0 || img.height() == 0 {
        return Err(RuntimeError::Image(format!("{what}: the image is empty")));
    }
    let rgb = img.to_rgb8();
    Ok(Rgb8 { width: rgb.width() as usize, height: rgb.height() as usize, data: rgb.into_raw() })
}

/// Reads and decodes an image file.
pub fn load(path: &Path) -> Result<Rgb8> {
    let bytes = std::fs::read(path).map_err(|e| RuntimeError::Image(format!("{}: {e}", path.display())))?;
    decode(&bytes, &path.display().to_string())
}

/// mm_utils.py `expand2square`: the image centred (offset `(side − w) // 2`) on a square of `background`.
pub fn expand_to_square(img: &Rgb8, background: [u8; 3]) -> Rgb8 {
    if img.width == img.height {
        return img.clone();
    }
    let side = img.width.max(img.height);
    let mut out = Rgb8::new(side, side, background);
    let (ox, oy) = ((side - img.width) / 2, (side - img.height) / 2);
    for y in 0..img.height {
        let src = &img.data[y * img.width * 3..(y + 1) * img.width * 3];
        let at = ((y + oy) * side + ox) * 3;
        out.data[at..at + src.len()].copy_from_slice(src);
    }
    out
}

fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc`: for every output index, the first input
/// index and the fixed-point taps.
fn coefficients(in_size: usize, out_size: usize) -> Vec<(usize, Vec<i32>)> {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = 2.0 * filterscale;
    (0..out_size)
        .map(|xx| {
            let center = (xx as f64 + 0.5) * scale;
            let ss = 1.0 / filterscale;
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            let w: Vec<f64> = (xmin..xmax).map(|x| bicubic((x as f64 - center + 0.5) * ss)).collect();
            let sum: f64 = w.iter().sum();
            let k = w
                .iter()
                .map(|v| {
                    let v = if sum != 0.0 { v / sum } else { *v };
                    let f = v * (1u32 << PRECISION_BITS) as f64;
                    (if v < 0.0 { f - 0.5 } else { f + 0.5 }) as i32
                })
                .collect();
            (xmin, k)
        })
        .collect()
}

fn clip8(acc: i64) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Pillow's BICUBIC `Image.resize` for RGB, bit-exact.
pub fn resize_bicubic(img: &Rgb8, out_w: usize, out_h: usize) -> Rgb8 {
    let mut cur = img.clone();
    if out_w != cur.width {
        let coeffs = coefficients(cur.width, out_w);
        let mut out = Rgb8::new(out_w, cur.height, [0; 3]);
        for y in 0..cur.height {
            for (xx, (xmin, k)) in coeffs.iter().enumerate() {
                let mut acc = [1i64 << (PRECISION_BITS - 1); 3];
                for (j, w) in k.iter().enumerate() {
                    let p = cur.px(xmin + j, y);
                    acc.iter_mut().zip(p).for_each(|(a, v)| *a += *v as i64 * *w as i64);
                }
                let at = (y * out_w + xx) * 3;
                out.data[at..at + 3].iter_mut().zip(acc).for_each(|(o, a)| *o = clip8(a));
            }
        }
        cur = out;
    }
    if out_h != cur.height {
        let coeffs = coefficients(cur.height, out_h);
        let mut out = Rgb8::new(cur.width, out_h, [0; 3]);
        for (yy, (ymin, k)) in coeffs.iter().enumerate() {
            for x in 0..cur.width {
                let mut acc = [1i64 << (PRECISION_BITS - 1); 3];
                for (j, w) in k.iter().enumerate() {
                    let p = cur.px(x, ymin + j);
                    acc.iter_mut().zip(p).for_each(|(a, v)| *a += *v as i64 * *w as i64);
                }
                let at = (yy * cur.width + x) * 3;
                out.data[at..at + 3].iter_mut().zip(acc).for_each(|(o, a)| *o = clip8(a));
            }
        }
        cur = out;
    }
    cur
}

/// transformers' `center_crop` of an image at least as large as the crop.
pub fn center_crop(img: &Rgb8, w: usize, h: usize) -> Rgb8 {
    if img.width == w && img.height == h {
        return img.clone();
    }
    let (left, top) = (img.width.saturating_sub(w) / 2, img.height.saturating_sub(h) / 2);
    let mut out = Rgb8::new(w, h, [0; 3]);
    for y in 0..h.min(img.height) {
        for x in 0..w.min(img.width) {
            let at = (y * w + x) * 3;
            out.data[at..at + 3].copy_from_slice(img.px(left + x, top + y));
        }
    }
    out
}

/// Rescale by 1/255 (in f64, then f32, as transformers' `rescale`) and normalise `(x − mean) / std`
/// in f32; channel-first `[3, H, W]`.
pub fn normalize(img: &Rgb8, mean: [f32; 3], std: [f32; 3]) -> Vec<f32> {
    let n = img.width * img.height;
    let mut out = vec![0f32; 3 * n];
    for i in 0..n {
        for c in 0..3 {
            let x = (img.data[i * 3 + c] as f64 * (1.0 / 255.0)) as f32;
            out[c * n + i] = (x - mean[c]) / std[c];
        }
    }
    out
}

/// The whole pipeline for a tower of side `size`: pad to square, resize, crop, normalise.
pub fn preprocess(img: &Rgb8, size: usize, pad: [u8; 3], mean: [f32; 3], std: [f32; 3]) -> Vec<f32> {
    let square = expand_to_square(img, pad);
    let resized = resize_bicubic(&square, size, size);
    normalize(&center_crop(&resized, size, size), mean, std)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coefficients_sum_to_one_in_fixed_point() {
        for (i, o) in [(123, 56), (48, 70), (90, 90), (1000, 336)] {
            for (_, k) in coefficients(i, o) {
                let s: i64 = k.iter().map(|v| *v as i64).sum();
                assert!((s - (1 << PRECISION_BITS)).abs() <= k.len() as i64, "{i}->{o}: {s}");
            }
        }
    }

    #[test]
    fn pad_centres_the_image() {
        let img = Rgb8::new(4, 2, [9, 9, 9]);
        let sq = expand_to_square(&img, [1, 2, 3]);
        assert_eq!((sq.width, sq.height), (4, 4));
        assert_eq!(sq.px(0, 0), [1, 2, 3]);
        assert_eq!(sq.px(0, 1), [9, 9, 9]);
        assert_eq!(sq.px(3, 3), [1, 2, 3]);
    }

    #[test]
    fn corrupt_and_unknown_bytes_are_errors() {
        assert!(decode(b"not an image", "x").is_err());
        let mut png = Vec::new();
        image::RgbImage::new(4, 4).write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png).unwrap();
        assert!(decode(&png, "ok").is_ok());
        png.truncate(png.len() / 2);
        assert!(decode(&png, "cut").is_err());
    }
}
