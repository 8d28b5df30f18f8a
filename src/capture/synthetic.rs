//! `synthetic:WxH`: a camera that renders a car-in-a-bay scene for each frame, with gradients,
//! hard edges, texture and sensor noise, so that decoding, resizing and compressing it cost what
//! a real frame costs. The scene differs per angle (car colour, framing) and per capture (the
//! car's position, the noise), so no two frames are the same bytes.

use image::RgbImage;

use super::{Camera, CaptureError};
use crate::imaging;
use crate::vehicle::PhotoLabel;

/// JPEG quality of the frames the synthetic camera delivers (a camera's own encoder).
const CAMERA_QUALITY: u8 = 92;

pub struct SyntheticCamera {
    id: String,
    width: u32,
    height: u32,
    captures: u64,
    /// Frames rendered ahead by `warm_up`, one per angle, used once each.
    ready: Vec<(PhotoLabel, Vec<u8>)>,
}

impl SyntheticCamera {
    pub fn new(id: &str, width: u32, height: u32) -> SyntheticCamera {
        SyntheticCamera { id: id.to_owned(), width, height, captures: 0, ready: Vec::new() }
    }

    fn render(&mut self, angle: PhotoLabel) -> Result<Vec<u8>, CaptureError> {
        self.captures += 1;
        let seed = seed_of(&self.id, angle, self.captures);
        // Rendered and encoded a band at a time: the camera never holds the whole frame's pixels.
        let mut scene = Scene::new(self.width, self.height, angle, seed);
        imaging::encode_bands(self.width, self.height, CAMERA_QUALITY, |first, band| {
            scene.render_rows(first, band)
        })
        .map_err(|e| CaptureError::NoFrame {
            camera: self.id.clone(),
            source_desc: format!("synthetic:{}x{}", self.width, self.height),
            reason: e.to_string(),
        })
    }
}

impl Camera for SyntheticCamera {
    fn capture(&mut self, angle: PhotoLabel) -> Result<Vec<u8>, CaptureError> {
        match self.ready.iter().position(|(a, _)| *a == angle) {
            Some(i) => Ok(self.ready.swap_remove(i).1),
            None => self.render(angle),
        }
    }

    fn warm_up(&mut self, angles: &[PhotoLabel]) -> Result<(), CaptureError> {
        for &angle in angles {
            if !self.ready.iter().any(|(a, _)| *a == angle) {
                let frame = self.render(angle)?;
                self.ready.push((angle, frame));
            }
        }
        Ok(())
    }
}

/// Renders one scene: a bay wall and floor, a car body with windows and wheels in a colour
/// that depends on `angle`, lit by a soft light, with per-pixel noise from `seed`.
pub fn render_scene(width: u32, height: u32, angle: PhotoLabel, seed: u64) -> RgbImage {
    let mut img = RgbImage::new(width, height);
    Scene::new(width, height, angle, seed).render_rows(0, &mut img);
    img
}

/// A scene of `render_scene`, rendered a band of rows at a time, top to bottom, so that a
/// camera can encode it without ever holding the whole frame.
struct Scene {
    width: u32,
    height: u32,
    body: [f32; 3],
    car_left: f32,
    car_right: f32,
    roof: f32,
    belt: f32,
    sill: f32,
    wheel_r: f32,
    wheels: [f32; 2],
    horizon: f32,
    /// The sensor noise generator; it runs over the pixels in order.
    noise: u64,
}

impl Scene {
    fn new(width: u32, height: u32, angle: PhotoLabel, seed: u64) -> Scene {
        let (w, h) = (width as f32, height as f32);
        // The car's framing moves a little with every capture, like a car that stopped elsewhere.
        let shift = ((seed >> 8) % 97) as f32 / 97.0 - 0.5;
        let car_left = w * (0.12 + 0.06 * shift);
        let car_right = w * (0.88 + 0.06 * shift);
        Scene {
            width,
            height,
            body: body_colour(angle),
            car_left,
            car_right,
            roof: h * 0.30,
            belt: h * 0.48,
            sill: h * 0.78,
            wheel_r: h * 0.11,
            wheels: [car_left + (car_right - car_left) * 0.2, car_left + (car_right - car_left) * 0.8],
            horizon: h * 0.62,
            noise: seed | 1,
        }
    }

    /// Renders the rows from `first` on into `out` (whole RGB rows); bands must come in order.
    fn render_rows(&mut self, first: u32, out: &mut [u8]) {
        let (width, height) = (self.width, self.height);
        let (w, h) = (width as f32, height as f32);
        let row_bytes = width as usize * 3;
        for (dy, row) in out.chunks_exact_mut(row_bytes).enumerate() {
            let y = first + dy as u32;
            let yf = y as f32;
            // Glasshouse: a trapezoid between roof and belt line.
            let inset = (self.belt - yf).max(0.0) * 0.6;
            for (x, px) in row.chunks_exact_mut(3).enumerate() {
                let x = x as u32;
                let xf = x as f32;
                let light = 1.0 - 0.35 * ((xf / w - 0.5).powi(2) + (yf / h - 0.4).powi(2));
                let mut c = if yf < self.horizon {
                    // Wall with tiles every 1/16 of the width.
                    let tile = if (x % (width / 16).max(1)) < 3 || (y % (height / 12).max(1)) < 3 {
                        0.7
                    } else {
                        1.0
                    };
                    [150.0 * tile, 155.0 * tile, 160.0 * tile]
                } else {
                    // Concrete: a coarse aggregate texture that costs the encoder what real ground does.
                    let t = (yf - self.horizon) / (h - self.horizon);
                    let grain =
                        ((x.wrapping_mul(2_654_435_761) ^ y.wrapping_mul(40_503)) >> 7 & 0x1f) as f32 - 15.5;
                    [90.0 + 40.0 * t + grain, 88.0 + 40.0 * t + grain, 85.0 + 40.0 * t + grain]
                };
                let in_body = xf > self.car_left && xf < self.car_right && yf > self.belt && yf < self.sill;
                let in_glass = yf > self.roof
                    && yf <= self.belt
                    && xf > self.car_left + inset
                    && xf < self.car_right - inset;
                if in_glass {
                    let glare = if (xf - yf * 0.8) as i32 % 211 < 40 { 60.0 } else { 0.0 };
                    c = [40.0 + glare, 50.0 + glare, 60.0 + glare];
                } else if in_body {
                    let shade = 0.75
                        + 0.25 * ((yf - self.belt) / (self.sill - self.belt) * std::f32::consts::PI).sin();
                    c = [self.body[0] * shade, self.body[1] * shade, self.body[2] * shade];
                }
                for wx in self.wheels {
                    let d2 = (xf - wx).powi(2) + (yf - self.sill).powi(2);
                    if d2 < self.wheel_r * self.wheel_r {
                        let rim = d2 < (self.wheel_r * 0.55).powi(2);
                        c = if rim { [170.0, 170.0, 175.0] } else { [25.0, 25.0, 28.0] };
                    }
                }
                let mut noise = self.noise;
                noise ^= noise << 13;
                noise ^= noise >> 7;
                noise ^= noise << 17;
                self.noise = noise;
                // Sensor noise, a little different in each channel as on a real Bayer sensor.
                let n = |shift: u64| ((noise >> shift) & 0xf) as f32 - 7.5;
                px[0] = (c[0] * light + n(0)).clamp(0.0, 255.0) as u8;
                px[1] = (c[1] * light + n(4)).clamp(0.0, 255.0) as u8;
                px[2] = (c[2] * light + n(8)).clamp(0.0, 255.0) as u8;
            }
        }
    }
}

fn body_colour(angle: PhotoLabel) -> [f32; 3] {
    const PALETTE: [[f32; 3]; 8] = [
        [170.0, 30.0, 35.0],
        [30.0, 70.0, 160.0],
        [200.0, 200.0, 205.0],
        [30.0, 30.0, 35.0],
        [40.0, 120.0, 60.0],
        [210.0, 150.0, 40.0],
        [120.0, 120.0, 130.0],
        [90.0, 40.0, 120.0],
    ];
    let index = PhotoLabel::ALL.iter().position(|l| *l == angle).unwrap_or(0);
    PALETTE[index % PALETTE.len()]
}

fn seed_of(camera: &str, angle: PhotoLabel, capture: u64) -> u64 {
    // FNV-1a over the camera, the angle and the capture number.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in camera.bytes().chain(angle.as_str().bytes()).chain(capture.to_le_bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_differ_per_angle_and_per_capture_and_are_valid_jpegs() {
        let mut cam = SyntheticCamera::new("front", 320, 240);
        let a = cam.capture(PhotoLabel::Front).unwrap();
        let b = cam.capture(PhotoLabel::Front).unwrap();
        let c = cam.capture(PhotoLabel::Rear).unwrap();
        assert_ne!(a, b);
        assert_ne!(a, c);
        cam.warm_up(&[PhotoLabel::Front]).unwrap();
        let warmed = cam.capture(PhotoLabel::Front).unwrap();
        assert!(warmed != a && warmed != b, "a warmed frame is a new frame");
        let header = imaging::check_complete(&a).unwrap();
        assert_eq!((header.width, header.height), (320, 240));
    }

    #[test]
    fn a_frame_rendered_in_bands_is_the_scene_rendered_whole() {
        let (w, h) = (200, 150);
        let banded = imaging::encode_bands(w, h, CAMERA_QUALITY, {
            let mut scene = Scene::new(w, h, PhotoLabel::Rear, 7);
            move |first, band| scene.render_rows(first, band)
        })
        .unwrap();
        let whole = render_scene(w, h, PhotoLabel::Rear, 7);
        let decoded = imaging::decode(&banded).unwrap().image;
        assert_eq!(decoded.dimensions(), (w, h));
        // The same picture, within what JPEG at this quality changes.
        let error: u64 =
            decoded.as_raw().iter().zip(whole.as_raw()).map(|(&a, &b)| u64::from(a.abs_diff(b))).sum();
        let mean_error = error as f64 / whole.as_raw().len() as f64;
        assert!(mean_error < 6.0, "mean error {mean_error} per sample");
        // And not just any picture: another scene is far from it.
        let other = render_scene(w, h, PhotoLabel::Front, 7);
        let apart: u64 =
            decoded.as_raw().iter().zip(other.as_raw()).map(|(&a, &b)| u64::from(a.abs_diff(b))).sum();
        assert!(apart as f64 / whole.as_raw().len() as f64 > 2.0 * mean_error, "{apart}");
    }

    #[test]
    fn scenes_are_textured_not_flat() {
        let img = render_scene(200, 150, PhotoLabel::Left, 42);
        let mut seen = std::collections::HashSet::new();
        for p in img.pixels() {
            seen.insert(p.0);
        }
        assert!(seen.len() > 500, "only {} distinct colours", seen.len());
    }
}
