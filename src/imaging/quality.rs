//! The quality gate: scores a frame's sharpness, exposure and glare on the pixels already decoded
//! for resizing, and judges them against a camera's thresholds, so that a blurred, dark or
//! blown-out frame is shot again while the car is still in the bay.
//!
//! The scores are measured on the luma (BT.601) of the upright frame at the size it was decoded
//! at (between one and two times the stored size), on `SAMPLED_BANDS` evenly spaced bands of
//! `2 * EDGE_REACH + 1` rows, leaving out what privacy masks cover:
//!
//! - **sharpness**: how steep the frame's edges are. Wherever the luma rises by at least
//!   `EDGE_RISE` levels over `2 * EDGE_REACH` pixels (along the centre row of a band, or down its
//!   columns), the steepest one-pixel step inside that span is compared with the whole rise; the
//!   score is 100 times the ratio, summed over all such edges and weighted by their rise, taken
//!   in the direction (across or down) where it is lower. An edge `w` pixels wide scores about
//!   `100 / w`: a crisp one 50 or more, a defocused or smeared one 30 or less. This is an edge-width
//!   measure in the line of Marziliano et al. (2002) rather than the variance of the Laplacian:
//!   on the project's photos the Laplacian's variance ranged from 17 to 1 800 for sharp photos
//!   and from 3 to 110 for blurred copies, because it counts texture as much as focus, so no
//!   threshold could tell them apart; the edge ratio does not depend on how much texture or
//!   contrast a scene has, and taking the worse direction catches motion blur, which only
//!   widens edges one way.
//! - **exposure**: the share of pixels crushed to black (luma ≤ `DARK_LEVEL`) and blown out
//!   (luma ≥ `BRIGHT_LEVEL`), and the mean luma, over the bands' centre rows.
//! - **glare**: the share of the frame covered by the largest patch of blown-out cells: the
//!   frame is cut into cells (`GLARE_CELLS` across the long side), a cell is blown out when
//!   three quarters of its samples are, and the largest 4-connected patch of such cells counts.
//!
//! Only pure functions of pixels: no clock, no file.

use image::RgbImage;

use super::mask::Raster;

/// Bands of rows the scores are measured on, evenly spaced.
pub const SAMPLED_BANDS: u32 = 64;
/// Half the span, in pixels, over which an edge's rise is measured (the span is 8 pixels).
pub const EDGE_REACH: usize = 4;
/// The rise in luma levels over the span that makes an edge.
pub const EDGE_RISE: u8 = 16;
/// Edges a direction needs before its sharpness counts.
pub const MIN_EDGES: u64 = 64;
/// Luma at or below this is crushed to black.
pub const DARK_LEVEL: u8 = 5;
/// Luma at or above this is blown out.
pub const BRIGHT_LEVEL: u8 = 250;
/// Cells across the frame's long side for the glare patches.
pub const GLARE_CELLS: u32 = 32;

/// What the gate measured on one frame.
#[derive(Debug, Clone, Copy, PartialEq, Default, serde::Serialize, serde::Deserialize)]
pub struct QualityScores {
    /// How steep the edges are, 0–100: about 100 divided by their width in pixels.
    pub sharpness: f64,
    /// Share of pixels crushed to black, 0.0–1.0.
    pub dark_clipped: f64,
    /// Share of pixels blown out, 0.0–1.0.
    pub bright_clipped: f64,
    /// Mean luma, 0–255.
    pub mean_luma: f64,
    /// Share of the frame covered by the largest blown-out patch, 0.0–1.0.
    pub glare: f64,
}

/// A camera's limits. A frame that breaks any of them is shot again.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct QualityThresholds {
    pub min_sharpness: f64,
    pub max_dark_clipped: f64,
    pub max_bright_clipped: f64,
    pub min_mean_luma: f64,
    pub max_mean_luma: f64,
    pub max_glare: f64,
}

impl QualityThresholds {
    /// The defaults, chosen on the project's real photos and on blurred, darkened and
    /// over-exposed copies of them (README, "Photo quality").
    pub const DEFAULT: QualityThresholds = QualityThresholds {
        min_sharpness: 32.0,
        max_dark_clipped: 0.35,
        max_bright_clipped: 0.08,
        min_mean_luma: 40.0,
        max_mean_luma: 220.0,
        max_glare: 0.06,
    };

    /// Thresholds that pass every frame.
    pub const OFF: QualityThresholds = QualityThresholds {
        min_sharpness: 0.0,
        max_dark_clipped: 1.0,
        max_bright_clipped: 1.0,
        min_mean_luma: 0.0,
        max_mean_luma: 255.0,
        max_glare: 1.0,
    };
}

impl Default for QualityThresholds {
    fn default() -> Self {
        QualityThresholds::DEFAULT
    }
}

/// One threshold a frame broke, with the value and the limit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Problem {
    Blurred { sharpness: f64, min: f64 },
    TooDark { mean_luma: f64, min: f64 },
    TooBright { mean_luma: f64, max: f64 },
    CrushedBlacks { share: f64, max: f64 },
    BlownHighlights { share: f64, max: f64 },
    Glare { share: f64, max: f64 },
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let pct = |v: f64| v * 100.0;
        match *self {
            Problem::Blurred { sharpness, min } => {
                write!(f, "blurred (sharpness {sharpness:.1}, min_sharpness {min})")
            }
            Problem::TooDark { mean_luma, min } => {
                write!(f, "too dark (mean luma {mean_luma:.0}, min_mean_luma {min})")
            }
            Problem::TooBright { mean_luma, max } => {
                write!(f, "too bright (mean luma {mean_luma:.0}, max_mean_luma {max})")
            }
            Problem::CrushedBlacks { share, max } => {
                write!(f, "{:.1} % crushed to black (max_dark_clipped {:.1} %)", pct(share), pct(max))
            }
            Problem::BlownHighlights { share, max } => {
                write!(f, "{:.1} % blown out (max_bright_clipped {:.1} %)", pct(share), pct(max))
            }
            Problem::Glare { share, max } => {
                write!(f, "glare over {:.1} % of the frame (max_glare {:.1} %)", pct(share), pct(max))
            }
        }
    }
}

impl Problem {
    /// How far past its limit the value is, as a fraction of the room the limit leaves
    /// (0 at the limit, 1 at the worst possible value).
    fn shortfall(&self) -> f64 {
        let beyond = |value: f64, limit: f64, worst: f64| {
            let room = (worst - limit).abs();
            if room <= f64::EPSILON {
                1.0
            } else {
                ((value - limit).abs() / room).min(1.0)
            }
        };
        match *self {
            Problem::Blurred { sharpness, min } => beyond(sharpness, min, 0.0),
            Problem::TooDark { mean_luma, min } => beyond(mean_luma, min, 0.0),
            Problem::TooBright { mean_luma, max } => beyond(mean_luma, max, 255.0),
            Problem::CrushedBlacks { share, max }
            | Problem::BlownHighlights { share, max }
            | Problem::Glare { share, max } => beyond(share, max, 1.0),
        }
    }
}

/// The gate's verdict on one frame.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Quality {
    pub scores: QualityScores,
    /// The thresholds broken; empty when the frame passes.
    pub problems: Vec<Problem>,
}

impl Quality {
    pub fn passes(&self) -> bool {
        self.problems.is_empty()
    }

    /// Why the frame is poor, in words (`None` when it passes).
    pub fn reason(&self) -> Option<String> {
        if self.problems.is_empty() {
            return None;
        }
        let parts: Vec<String> = self.problems.iter().map(Problem::to_string).collect();
        Some(parts.join(", "))
    }

    /// How poor the frame is: 0 when it passes, more the further it is past its thresholds.
    /// Of several poor frames of an angle, the one with the least is kept.
    pub fn shortfall(&self) -> f64 {
        self.problems.iter().map(Problem::shortfall).sum()
    }
}

/// Judges `scores` against `limits`.
pub fn judge(scores: QualityScores, limits: &QualityThresholds) -> Quality {
    let mut problems = Vec::new();
    if scores.sharpness < limits.min_sharpness {
        problems.push(Problem::Blurred { sharpness: scores.sharpness, min: limits.min_sharpness });
    }
    if scores.mean_luma < limits.min_mean_luma {
        problems.push(Problem::TooDark { mean_luma: scores.mean_luma, min: limits.min_mean_luma });
    }
    if scores.mean_luma > limits.max_mean_luma {
        problems.push(Problem::TooBright { mean_luma: scores.mean_luma, max: limits.max_mean_luma });
    }
    if scores.dark_clipped > limits.max_dark_clipped {
        problems.push(Problem::CrushedBlacks { share: scores.dark_clipped, max: limits.max_dark_clipped });
    }
    if scores.bright_clipped > limits.max_bright_clipped {
        problems
            .push(Problem::BlownHighlights { share: scores.bright_clipped, max: limits.max_bright_clipped });
    }
    if scores.glare > limits.max_glare {
        problems.push(Problem::Glare { share: scores.glare, max: limits.max_glare });
    }
    Quality { scores, problems }
}

/// Measures an upright frame, leaving out the pixels `masks` covers (a raster of the same size;
/// an empty one leaves out nothing). A frame with every sampled pixel masked scores as a flat
/// mid-grey one would, with no sharpness.
pub fn score(image: &RgbImage, masks: &Raster) -> QualityScores {
    let (width, height) = image.dimensions();
    if width < 3 || height < 3 {
        return QualityScores { mean_luma: 128.0, ..QualityScores::default() };
    }
    let w = width as usize;
    let reach = EDGE_REACH.min((height as usize - 1) / 2).min((w - 1) / 2);
    let band_rows = 2 * reach + 1;
    let cell = (width.max(height).div_ceil(GLARE_CELLS)).max(1);
    let cell_columns = width.div_ceil(cell) as usize;
    let cell_of_x: Vec<u16> = (0..width).map(|x| (x / cell) as u16).collect();
    let mut cell_samples = vec![0u32; cell_columns * height.div_ceil(cell) as usize];
    let mut cell_bright = vec![0u32; cell_samples.len()];

    let mut rows = vec![vec![0u8; w]; band_rows];
    let mut steps = vec![0u8; w];
    let mut histogram = [0u64; 256];
    let mut across = Edges::default();
    let mut down = Edges::default();
    let mut covered = Vec::new();
    let mut kept = Vec::new();
    let raw: &[u8] = image.as_raw();
    let last_centre = height as usize - 1 - reach;
    let bands = (SAMPLED_BANDS as usize).min(last_centre - reach + 1);
    for band in 0..bands {
        let centre = reach + band * (last_centre - reach) / (bands - 1).max(1);
        for (i, row) in rows.iter_mut().enumerate() {
            luma_row(raw, w, (centre - reach + i) as u32, row);
        }
        if masks.is_empty() {
            kept.clear();
            kept.push((0, width));
        } else {
            masks.covered(centre as u32, &mut covered);
            complement(&covered, width, &mut kept);
        }
        let line = &rows[reach];
        for (step, pair) in steps.iter_mut().zip(line.windows(2)) {
            *step = pair[0].abs_diff(pair[1]);
        }
        let cell_row = (centre / cell as usize) * cell_columns;
        for &(start, end) in &kept {
            let (start, end) = (start as usize, end as usize);
            for x in start..end {
                let v = line[x];
                histogram[usize::from(v)] += 1;
                let c = cell_row + usize::from(cell_of_x[x]);
                cell_samples[c] += 1;
                cell_bright[c] += u32::from(v >= BRIGHT_LEVEL);
                // Down the column: the rise from the band's top row to its bottom row.
                let rise = rows[0][x].abs_diff(rows[band_rows - 1][x]);
                if rise >= EDGE_RISE {
                    let steepest = rows.windows(2).map(|r| r[0][x].abs_diff(r[1][x])).max().unwrap_or(0);
                    down.add(steepest, rise);
                }
            }
            // Along the row: the rise over the span centred on x.
            for x in start.max(reach)..end.min(w - reach) {
                let rise = line[x - reach].abs_diff(line[x + reach]);
                if rise >= EDGE_RISE {
                    let steepest = steps[x - reach..x + reach].iter().copied().max().unwrap_or(0);
                    across.add(steepest, rise);
                }
            }
        }
    }

    let pixels: u64 = histogram.iter().sum();
    if pixels == 0 {
        return QualityScores { mean_luma: 128.0, ..QualityScores::default() };
    }
    let share = |levels: std::ops::RangeInclusive<usize>| {
        histogram[levels].iter().sum::<u64>() as f64 / pixels as f64
    };
    let mean_luma =
        histogram.iter().enumerate().map(|(v, &count)| v as f64 * count as f64).sum::<f64>() / pixels as f64;
    let glare = largest_patch(&cell_samples, &cell_bright, cell_columns) as f64 / pixels as f64;
    QualityScores {
        sharpness: Edges::sharpness(&across, &down),
        dark_clipped: share(0..=usize::from(DARK_LEVEL)),
        bright_clipped: share(usize::from(BRIGHT_LEVEL)..=255),
        mean_luma,
        glare,
    }
}

/// The edges found in one direction.
#[derive(Default)]
struct Edges {
    count: u64,
    /// Sum of the steepest one-pixel steps (each at most its edge's rise).
    steep: u64,
    /// Sum of the rises.
    rise: u64,
}

impl Edges {
    fn add(&mut self, steepest: u8, rise: u8) {
        self.count += 1;
        self.steep += u64::from(steepest.min(rise));
        self.rise += u64::from(rise);
    }

    fn ratio(&self) -> f64 {
        100.0 * self.steep as f64 / self.rise.max(1) as f64
    }

    /// The lower of the two directions' scores. A direction with fewer than `MIN_EDGES` edges
    /// scores 0 when the other has many (everything is smeared along it), and is left out
    /// otherwise; a frame with no edges either way scores 0.
    fn sharpness(a: &Edges, b: &Edges) -> f64 {
        let judge = |this: &Edges, other: &Edges| {
            if this.count >= MIN_EDGES {
                Some(this.ratio())
            } else if other.count >= 8 * MIN_EDGES {
                Some(0.0)
            } else {
                None
            }
        };
        match (judge(a, b), judge(b, a)) {
            (Some(x), Some(y)) => x.min(y),
            (Some(x), None) | (None, Some(x)) => x,
            (None, None) => 0.0,
        }
    }
}

/// The luma (BT.601, integer weights) of row `y` of packed RGB pixels.
fn luma_row(raw: &[u8], width: usize, y: u32, out: &mut [u8]) {
    let start = y as usize * width * 3;
    let Some(row) = raw.get(start..start + width * 3) else {
        return;
    };
    for (px, luma) in row.chunks_exact(3).zip(out.iter_mut()) {
        let weighted = 77 * u32::from(px[0]) + 150 * u32::from(px[1]) + 29 * u32::from(px[2]) + 128;
        *luma = (weighted >> 8) as u8;
    }
}

/// The column ranges of `[0, width)` outside the sorted, disjoint `covered` spans.
fn complement(covered: &[(u32, u32)], width: u32, kept: &mut Vec<(u32, u32)>) {
    kept.clear();
    let mut from = 0;
    for &(start, end) in covered {
        if start > from {
            kept.push((from, start));
        }
        from = from.max(end);
    }
    if from < width {
        kept.push((from, width));
    }
}

/// The samples in the largest 4-connected patch of blown-out cells (three quarters or more of
/// a cell's samples blown out).
fn largest_patch(samples: &[u32], bright: &[u32], columns: usize) -> u64 {
    let blown: Vec<bool> =
        samples.iter().zip(bright).map(|(&n, &b)| n > 0 && u64::from(b) * 4 >= u64::from(n) * 3).collect();
    let mut seen = vec![false; blown.len()];
    let mut largest = 0u64;
    let mut stack = Vec::new();
    for start in 0..blown.len() {
        if !blown[start] || seen[start] {
            continue;
        }
        seen[start] = true;
        stack.push(start);
        let mut patch = 0u64;
        while let Some(c) = stack.pop() {
            patch += u64::from(samples[c]);
            let (row, column) = (c / columns, c % columns);
            let neighbours = [
                (column > 0).then(|| c - 1),
                (column + 1 < columns).then(|| c + 1),
                (row > 0).then(|| c - columns),
                Some(c + columns).filter(|&n| n < blown.len()),
            ];
            for n in neighbours.into_iter().flatten() {
                if blown[n] && !seen[n] {
                    seen[n] = true;
                    stack.push(n);
                }
            }
        }
        largest = largest.max(patch);
    }
    largest
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::imaging::mask::{Fill, Mask};
    use image::Rgb;

    fn no_masks(image: &RgbImage) -> Raster {
        Raster::new(&[], image.width(), image.height())
    }

    /// A checkerboard of `square`-pixel squares in grey levels `a` and `b`.
    fn checkerboard(width: u32, height: u32, square: u32, a: u8, b: u8) -> RgbImage {
        RgbImage::from_fn(width, height, |x, y| {
            let v = if (x / square + y / square) % 2 == 0 { a } else { b };
            Rgb([v, v, v])
        })
    }

    #[test]
    fn a_flat_frame_has_no_sharpness_and_its_level_as_mean() {
        let grey = RgbImage::from_pixel(300, 200, Rgb([90, 90, 90]));
        let s = score(&grey, &no_masks(&grey));
        assert_eq!(s.sharpness, 0.0);
        assert_eq!(s.mean_luma, 90.0);
        assert_eq!((s.dark_clipped, s.bright_clipped, s.glare), (0.0, 0.0, 0.0));
    }

    /// Squares of `square` pixels in grey levels 60 and 180, each edge a ramp `ramp` pixels
    /// wide, across (`across`) and down (`down`).
    fn ramps(square: u32, across: u32, down: u32) -> RgbImage {
        let level = |t: u32, ramp: u32| -> f64 {
            let phase = t % (2 * square);
            let up = |p: u32| (f64::from(p) / f64::from(ramp.max(1))).min(1.0);
            if phase < square {
                up(phase)
            } else {
                1.0 - up(phase - square)
            }
        };
        RgbImage::from_fn(480, 360, |x, y| {
            let v = (60.0 + 120.0 * (level(x, across) + level(y, down)) / 2.0).round() as u8;
            Rgb([v, v, v])
        })
    }

    #[test]
    fn sharpness_falls_as_edges_widen_and_the_worse_direction_counts() {
        let sharpness = |image: RgbImage| score(&image, &no_masks(&image)).sharpness;
        let (one, two, four, six) = (
            sharpness(ramps(24, 1, 1)),
            sharpness(ramps(24, 2, 2)),
            sharpness(ramps(24, 4, 4)),
            sharpness(ramps(24, 6, 6)),
        );
        // A one-pixel edge scores 100; wider ones about 100 over their width (a little more:
        // spans that hold only part of a ramp see a steeper step).
        assert_eq!(one, 100.0);
        assert!((50.0..=60.0).contains(&two), "{two}");
        assert!((26.0..=34.0).contains(&four), "{four}");
        assert!((20.0..=28.0).contains(&six) && six < four, "{six}");
        // Smeared one way only: the worse direction counts, whichever it is.
        let across = sharpness(ramps(24, 6, 1));
        let down = sharpness(ramps(24, 1, 6));
        assert!((across - six).abs() < 1.0 && (down - six).abs() < 1.0, "{across} {down} {six}");
        // Contrast does not matter, width does.
        let faint = RgbImage::from_fn(480, 360, |x, y| {
            let v = if (x / 24 + y / 24) % 2 == 0 { 100 } else { 130 };
            Rgb([v, v, v])
        });
        assert_eq!(sharpness(faint), 100.0);
        // Edges only one way, and none the other: smeared beyond recognition along it.
        let stripes =
            RgbImage::from_fn(480, 360, |x, _| if x / 24 % 2 == 0 { Rgb([60; 3]) } else { Rgb([180; 3]) });
        assert_eq!(sharpness(stripes), 0.0);
    }

    #[test]
    fn clipped_shares_and_glare_count_the_extremes() {
        // Left half black, a white square of a quarter of the frame, the rest mid-grey (416
        // pixels: glare cells of 13 pixels line up with the halves).
        let image = RgbImage::from_fn(416, 416, |x, y| match (x, y) {
            (0..=207, _) => Rgb([0, 0, 0]),
            (208.., 0..=207) => Rgb([255, 255, 255]),
            _ => Rgb([128, 128, 128]),
        });
        let s = score(&image, &no_masks(&image));
        assert!((s.dark_clipped - 0.5).abs() < 0.01, "{s:?}");
        assert!((s.bright_clipped - 0.25).abs() < 0.01, "{s:?}");
        assert!((s.glare - 0.25).abs() < 0.02, "{s:?}");
        // Scattered highlights are not glare: every other 8-pixel square is white.
        let sparkle = checkerboard(400, 400, 8, 255, 100);
        let s = score(&sparkle, &no_masks(&sparkle));
        assert!((s.bright_clipped - 0.5).abs() < 0.02, "{s:?}");
        assert!(s.glare < 0.01, "{s:?}");
    }

    #[test]
    fn masked_pixels_are_left_out_of_the_scores() {
        // The right half is blown out, and masked.
        let image =
            RgbImage::from_fn(400, 300, |x, _| if x < 200 { Rgb([100, 100, 100]) } else { Rgb([255; 3]) });
        let right = Mask::new(None, vec![[0.5, 0.0], [1.0, 0.0], [1.0, 1.0], [0.5, 1.0]], Fill::Black)
            .expect("valid mask");
        let s = score(&image, &Raster::new(&[right], 400, 300));
        assert_eq!((s.bright_clipped, s.glare, s.mean_luma), (0.0, 0.0, 100.0), "{s:?}");
        let all = Mask::new(None, vec![[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]], Fill::Black)
            .expect("valid mask");
        let s = score(&image, &Raster::new(&[all], 400, 300));
        assert_eq!(s.mean_luma, 128.0, "all masked: neutral scores");
    }

    #[test]
    fn the_verdict_names_each_broken_threshold_and_ranks_poor_frames() {
        let limits = QualityThresholds::DEFAULT;
        let good = QualityScores {
            sharpness: 60.0,
            dark_clipped: 0.01,
            bright_clipped: 0.01,
            mean_luma: 110.0,
            glare: 0.0,
        };
        assert!(judge(good, &limits).passes());
        assert_eq!(judge(good, &limits).reason(), None);
        let soft = judge(QualityScores { sharpness: 28.0, ..good }, &limits);
        assert_eq!(soft.reason().as_deref(), Some("blurred (sharpness 28.0, min_sharpness 32)"));
        let softer = judge(QualityScores { sharpness: 20.0, ..good }, &limits);
        assert!(softer.shortfall() > soft.shortfall());
        let dark = judge(QualityScores { mean_luma: 20.0, dark_clipped: 0.7, ..good }, &limits);
        let reason = dark.reason().unwrap_or_default();
        assert!(
            reason.contains("too dark (mean luma 20") && reason.contains("70.0 % crushed to black"),
            "{reason}"
        );
        let bright =
            judge(QualityScores { mean_luma: 240.0, bright_clipped: 0.6, glare: 0.5, ..good }, &limits);
        assert_eq!(bright.problems.len(), 3, "{bright:?}");
        assert!(judge(QualityScores::default(), &QualityThresholds::OFF).passes());
    }
}
