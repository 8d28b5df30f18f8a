//! Privacy masks: polygons over the upright picture, in fractions of its width and height, that
//! are filled in (black, or pixelated) on the final image before it is encoded, so that what
//! they cover never reaches the buffer, the upload or a page.
//!
//! A mask's coordinates are fractions of the upright picture, so the same mask fits every size
//! the picture is made at: the final image after orientation and resizing, and the decoded frame
//! the quality gate looks at (which leaves masked pixels out of its scores). A pixel is covered
//! when its centre lies inside the polygon (non-zero winding, so a self-crossing polygon covers
//! everything it encloses). Pixelated masks are filled first and black ones last, so black wins
//! where masks overlap.

use image::{Rgb, RgbImage};

/// The most points a mask's polygon may have.
pub const MAX_POINTS: usize = 256;
/// Pixelation blocks are this fraction of the image's long edge (1/48: 40 px at 1920 px), and
/// at least `MIN_PIXELATE_BLOCK` pixels: coarse enough that faces and plates cannot be read.
pub const PIXELATE_BLOCKS_ON_LONG_EDGE: u32 = 48;
/// The smallest pixelation block, in pixels.
pub const MIN_PIXELATE_BLOCK: u32 = 8;
/// Points this close to one line (twice the triangle area, in fractions of the picture) enclose
/// nothing.
const MIN_SPREAD: f64 = 1e-9;

/// How a mask hides what it covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Fill {
    /// Pure black (RGB 0,0,0).
    #[default]
    Black,
    /// Blocks of `PIXELATE_BLOCKS_ON_LONG_EDGE` of the long edge, each the mean colour of the
    /// covered pixels in it.
    Pixelate,
}

impl Fill {
    /// The configuration's names: `black`, `pixelate`.
    pub fn parse(name: &str) -> Option<Fill> {
        match name.trim().to_ascii_lowercase().as_str() {
            "black" => Some(Fill::Black),
            "pixelate" => Some(Fill::Pixelate),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Fill::Black => "black",
            Fill::Pixelate => "pixelate",
        }
    }
}

/// One privacy mask. A `Mask` that exists has 3 to `MAX_POINTS` points, each inside the picture
/// (0.0 to 1.0 on both axes), enclosing some area.
#[derive(Debug, Clone, PartialEq)]
pub struct Mask {
    name: Option<String>,
    polygon: Vec<[f64; 2]>,
    fill: Fill,
}

/// Why a polygon cannot be a mask.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum MaskError {
    /// Fewer than 3 points, or more than `MAX_POINTS`.
    #[error("has {points} point(s); a polygon needs 3 to {MAX_POINTS}")]
    PointCount { points: usize },
    /// A point outside the picture (or not a number).
    #[error(
        "point {number} [{x}, {y}] lies outside the picture; x and y are fractions of the upright \
         picture's width and height, from 0.0 to 1.0"
    )]
    OutsideFrame {
        /// The point's position in the list, from 1.
        number: usize,
        x: f64,
        y: f64,
    },
    /// The points are on one line (or all the same): the polygon covers nothing.
    #[error("encloses no area (its points lie on one line)")]
    NoArea,
}

impl Mask {
    /// A mask over `polygon` (`[x, y]` fractions of the upright picture), checked.
    pub fn new(name: Option<String>, polygon: Vec<[f64; 2]>, fill: Fill) -> Result<Mask, MaskError> {
        if !(3..=MAX_POINTS).contains(&polygon.len()) {
            return Err(MaskError::PointCount { points: polygon.len() });
        }
        for (i, &[x, y]) in polygon.iter().enumerate() {
            if !((0.0..=1.0).contains(&x) && (0.0..=1.0).contains(&y)) {
                return Err(MaskError::OutsideFrame { number: i + 1, x, y });
            }
        }
        if on_one_line(&polygon) {
            return Err(MaskError::NoArea);
        }
        Ok(Mask { name, polygon, fill })
    }

    pub fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    pub fn polygon(&self) -> &[[f64; 2]] {
        &self.polygon
    }

    pub fn fill(&self) -> Fill {
        self.fill
    }

    /// The share of the picture the mask covers (0.0 to 1.0), measured on a 1000x1000 grid.
    pub fn area(&self) -> f64 {
        Raster::new(std::slice::from_ref(self), 1000, 1000).covered_pixels() as f64 / 1e6
    }
}

/// Masks laid over a `width`x`height` image, to be read row by row.
pub struct Raster {
    shapes: Vec<Shape>,
    width: u32,
    height: u32,
}

/// One mask in pixel coordinates.
struct Shape {
    fill: Fill,
    edges: Vec<Edge>,
    /// The rows whose centres may lie inside.
    rows: std::ops::Range<u32>,
}

#[derive(Clone, Copy)]
struct Edge {
    x0: f64,
    y0: f64,
    x1: f64,
    y1: f64,
}

impl Raster {
    /// Scales `masks` to an image of `width`x`height` pixels.
    pub fn new(masks: &[Mask], width: u32, height: u32) -> Raster {
        let (w, h) = (f64::from(width), f64::from(height));
        let shapes = masks
            .iter()
            .map(|m| {
                let points: Vec<(f64, f64)> = m.polygon.iter().map(|&[x, y]| (x * w, y * h)).collect();
                let edges: Vec<Edge> = points
                    .iter()
                    .zip(points.iter().cycle().skip(1))
                    .map(|(&(x0, y0), &(x1, y1))| Edge { x0, y0, x1, y1 })
                    .collect();
                let top = points.iter().map(|p| p.1).fold(f64::INFINITY, f64::min);
                let bottom = points.iter().map(|p| p.1).fold(f64::NEG_INFINITY, f64::max);
                // Row y's centre is y + 0.5.
                let first = (top - 0.5).ceil().max(0.0) as u32;
                let end = ((bottom - 0.5).ceil().max(0.0) as u32).min(height);
                Shape { fill: m.fill, edges, rows: first.min(end)..end }
            })
            .collect();
        Raster { shapes, width, height }
    }

    /// Whether no mask is laid.
    pub fn is_empty(&self) -> bool {
        self.shapes.is_empty()
    }

    pub fn width(&self) -> u32 {
        self.width
    }

    pub fn height(&self) -> u32 {
        self.height
    }

    /// Replaces `out` with the pixels of row `y` that any mask covers, as sorted, disjoint,
    /// non-touching `[start, end)` column ranges.
    pub fn covered(&self, y: u32, out: &mut Vec<(u32, u32)>) {
        out.clear();
        for shape in &self.shapes {
            shape.spans(y, self.width, out);
        }
        merge(out);
    }

    /// How many pixels of the image the masks cover.
    pub fn covered_pixels(&self) -> u64 {
        let mut spans = Vec::new();
        (0..self.height)
            .map(|y| {
                self.covered(y, &mut spans);
                spans.iter().map(|&(a, b)| u64::from(b - a)).sum::<u64>()
            })
            .sum()
    }
}

impl Shape {
    /// Appends the spans of row `y` this shape covers (non-zero winding at pixel centres).
    fn spans(&self, y: u32, width: u32, out: &mut Vec<(u32, u32)>) {
        if !self.rows.contains(&y) {
            return;
        }
        let centre = f64::from(y) + 0.5;
        let mut crossings: Vec<(f64, i32)> = self
            .edges
            .iter()
            .filter(|e| (e.y0 <= centre) != (e.y1 <= centre))
            .map(|e| {
                let x = e.x0 + (centre - e.y0) * (e.x1 - e.x0) / (e.y1 - e.y0);
                (x, if e.y1 > e.y0 { 1 } else { -1 })
            })
            .collect();
        crossings.sort_by(|a, b| a.0.total_cmp(&b.0));
        let mut winding = 0;
        let mut start = 0.0;
        for (x, direction) in crossings {
            let before = winding;
            winding += direction;
            if before == 0 && winding != 0 {
                start = x;
            } else if before != 0 && winding == 0 {
                // Columns whose centre i + 0.5 lies in [start, x).
                let first = column(start, width);
                let end = column(x, width);
                if first < end {
                    out.push((first, end));
                }
            }
        }
    }
}

/// The first column whose centre is at or right of `x`, clamped to the image.
fn column(x: f64, width: u32) -> u32 {
    (x - 0.5).ceil().clamp(0.0, f64::from(width)) as u32
}

/// Sorts spans and merges those that overlap or touch.
fn merge(spans: &mut Vec<(u32, u32)>) {
    if spans.len() < 2 {
        return;
    }
    spans.sort_unstable();
    let mut merged = 0;
    for i in 1..spans.len() {
        let (start, end) = spans[i];
        if start <= spans[merged].1 {
            spans[merged].1 = spans[merged].1.max(end);
        } else {
            merged += 1;
            spans[merged] = (start, end);
        }
    }
    spans.truncate(merged + 1);
}

/// Fills every mask into `image`, which must be upright (masks are fractions of the upright
/// picture): pixelated masks first, black ones last.
pub fn apply(image: &mut RgbImage, masks: &[Mask]) {
    if masks.is_empty() {
        return;
    }
    let raster = Raster::new(masks, image.width(), image.height());
    let mut spans = Vec::new();
    for shape in raster.shapes.iter().filter(|s| s.fill == Fill::Pixelate) {
        pixelate(image, shape, &mut spans);
    }
    let width = raster.width as usize;
    let black: Vec<&Shape> = raster.shapes.iter().filter(|s| s.fill == Fill::Black).collect();
    if black.is_empty() {
        return;
    }
    let raw: &mut [u8] = image;
    for y in 0..raster.height {
        spans.clear();
        for shape in &black {
            shape.spans(y, raster.width, &mut spans);
        }
        merge(&mut spans);
        let row = y as usize * width * 3;
        for &(a, b) in &spans {
            if let Some(pixels) = raw.get_mut(row + a as usize * 3..row + b as usize * 3) {
                pixels.fill(0);
            }
        }
    }
}

/// The pixelation block size for an image whose long edge is `long_edge` pixels.
pub fn pixelate_block(long_edge: u32) -> u32 {
    (long_edge / PIXELATE_BLOCKS_ON_LONG_EDGE).max(MIN_PIXELATE_BLOCK)
}

/// Replaces each covered pixel by the mean colour of the covered pixels of its block.
fn pixelate(image: &mut RgbImage, shape: &Shape, spans: &mut Vec<(u32, u32)>) {
    let (width, height) = image.dimensions();
    let block = pixelate_block(width.max(height));
    let columns = width.div_ceil(block) as usize;
    let mut sums = vec![[0u64; 4]; columns];
    let mut means = vec![[0u8; 3]; columns];
    let stride = width as usize * 3;
    let raw: &mut [u8] = image;
    // The pieces of a span that fall in one block: (block column, pixel range in the row).
    let pieces = |(a, b): (u32, u32)| {
        (a / block..b.div_ceil(block)).map(move |column| {
            let range = a.max(column * block)..b.min((column + 1) * block);
            (column as usize, range.start as usize * 3..range.end as usize * 3)
        })
    };
    let mut band = shape.rows.start / block * block;
    while band < shape.rows.end {
        let rows = band.max(shape.rows.start)..(band + block).min(shape.rows.end).min(height);
        sums.iter_mut().for_each(|s| *s = [0; 4]);
        for y in rows.clone() {
            spans.clear();
            shape.spans(y, width, spans);
            let row = &raw[y as usize * stride..(y as usize + 1) * stride];
            for (column, bytes) in spans.iter().flat_map(|&span| pieces(span)) {
                let s = &mut sums[column];
                for px in row[bytes].chunks_exact(3) {
                    s[0] += u64::from(px[0]);
                    s[1] += u64::from(px[1]);
                    s[2] += u64::from(px[2]);
                    s[3] += 1;
                }
            }
        }
        for (mean, s) in means.iter_mut().zip(&sums) {
            let n = s[3].max(1);
            *mean = [0, 1, 2].map(|c| ((s[c] + n / 2) / n) as u8);
        }
        for y in rows {
            spans.clear();
            shape.spans(y, width, spans);
            let row = &mut raw[y as usize * stride..(y as usize + 1) * stride];
            for (column, bytes) in spans.iter().flat_map(|&span| pieces(span)) {
                for px in row[bytes].chunks_exact_mut(3) {
                    px.copy_from_slice(&means[column]);
                }
            }
        }
        band += block;
    }
}

/// The outline colour of mask `index` on previews (also named by `outline_colour_name`).
pub fn outline_colour(index: usize) -> Rgb<u8> {
    OUTLINE_COLOURS[index % OUTLINE_COLOURS.len()].1
}

/// The name of mask `index`'s outline colour on previews.
pub fn outline_colour_name(index: usize) -> &'static str {
    OUTLINE_COLOURS[index % OUTLINE_COLOURS.len()].0
}

const OUTLINE_COLOURS: [(&str, Rgb<u8>); 6] = [
    ("yellow", Rgb([255, 230, 0])),
    ("cyan", Rgb([0, 230, 255])),
    ("magenta", Rgb([255, 0, 200])),
    ("green", Rgb([40, 255, 40])),
    ("orange", Rgb([255, 140, 0])),
    ("red", Rgb([255, 30, 30])),
];

/// Draws what an installer needs to place masks onto an upright image: a dotted grid every
/// tenth of the width and height (white), and each mask's outline in its colour
/// (`outline_colour`), about 1/240 of the long edge thick (at least 5 pixels).
pub fn draw_guides(image: &mut RgbImage, masks: &[Mask]) {
    let (width, height) = image.dimensions();
    if width == 0 || height == 0 {
        return;
    }
    let white = Rgb([255, 255, 255]);
    for tenth in 1..10u32 {
        let x = width * tenth / 10;
        let y = height * tenth / 10;
        for t in (0..height).filter(|t| t % 8 < 4) {
            image.put_pixel(x.min(width - 1), t, white);
        }
        for t in (0..width).filter(|t| t % 8 < 4) {
            image.put_pixel(t, y.min(height - 1), white);
        }
    }
    let thickness = (width.max(height) / 240).max(4) as i64;
    let (w, h) = (f64::from(width), f64::from(height));
    for (index, mask) in masks.iter().enumerate() {
        let colour = outline_colour(index);
        let points = &mask.polygon;
        for (a, b) in points.iter().zip(points.iter().cycle().skip(1)) {
            let (x0, y0, x1, y1) = (a[0] * w, a[1] * h, b[0] * w, b[1] * h);
            let steps = ((x1 - x0).abs().max((y1 - y0).abs()) * 2.0).ceil().max(1.0) as u32;
            for s in 0..=steps {
                let t = f64::from(s) / f64::from(steps);
                let (cx, cy) = ((x0 + (x1 - x0) * t) as i64, (y0 + (y1 - y0) * t) as i64);
                for dy in -thickness / 2..=thickness / 2 {
                    for dx in -thickness / 2..=thickness / 2 {
                        let (px, py) = (cx + dx, cy + dy);
                        if (0..i64::from(width)).contains(&px) && (0..i64::from(height)).contains(&py) {
                            image.put_pixel(px as u32, py as u32, colour);
                        }
                    }
                }
            }
        }
    }
}

/// Whether every point lies on one line through the first one and the point farthest from it
/// (so the polygon encloses nothing, whichever way it winds).
fn on_one_line(polygon: &[[f64; 2]]) -> bool {
    let Some(&[x0, y0]) = polygon.first() else {
        return true;
    };
    let distance = |p: &[f64; 2]| (p[0] - x0).powi(2) + (p[1] - y0).powi(2);
    let Some(far) = polygon.iter().max_by(|a, b| distance(a).total_cmp(&distance(b))) else {
        return true;
    };
    let (dx, dy) = (far[0] - x0, far[1] - y0);
    polygon.iter().all(|p| (dx * (p[1] - y0) - dy * (p[0] - x0)).abs() < MIN_SPREAD)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mask(points: &[[f64; 2]], fill: Fill) -> Mask {
        Mask::new(None, points.to_vec(), fill).expect("a valid mask")
    }

    /// The covered columns of every row, as a picture of '#' and '.'.
    fn picture(masks: &[Mask], width: u32, height: u32) -> Vec<String> {
        let raster = Raster::new(masks, width, height);
        let mut spans = Vec::new();
        (0..height)
            .map(|y| {
                raster.covered(y, &mut spans);
                (0..width)
                    .map(|x| if spans.iter().any(|&(a, b)| (a..b).contains(&x)) { '#' } else { '.' })
                    .collect()
            })
            .collect()
    }

    fn check(masks: &[Mask], width: u32, height: u32, expected: &[&str]) {
        assert_eq!(picture(masks, width, height), expected);
    }

    #[test]
    fn a_rectangle_covers_the_pixels_whose_centres_are_inside() {
        let left_half = mask(&[[0.0, 0.0], [0.5, 0.0], [0.5, 1.0], [0.0, 1.0]], Fill::Black);
        check(&[left_half], 8, 2, &["####....", "####...."]);
        let whole = mask(&[[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]], Fill::Black);
        check(&[whole], 4, 3, &["####", "####", "####"]);
        // A quarter-pixel sliver covers no pixel centre.
        let sliver = mask(&[[0.0, 0.0], [0.03, 0.0], [0.03, 1.0], [0.0, 1.0]], Fill::Black);
        check(&[sliver], 8, 1, &["........"]);
    }

    #[test]
    fn a_triangle_and_overlapping_masks_merge_into_one_coverage() {
        let triangle = mask(&[[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]], Fill::Black);
        check(std::slice::from_ref(&triangle), 4, 4, &["###.", "##..", "#...", "...."]);
        let right = mask(&[[0.75, 0.0], [1.0, 0.0], [1.0, 1.0], [0.75, 1.0]], Fill::Pixelate);
        check(&[triangle, right], 4, 4, &["####", "##.#", "#..#", "...#"]);
    }

    #[test]
    fn a_self_crossing_polygon_covers_all_it_encloses() {
        // A bow tie: two triangles, one on top of the other, meeting in the middle; the lower
        // one winds the other way.
        let bow = mask(&[[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], Fill::Black);
        check(&[bow], 8, 4, &[".######.", "...##...", "...##...", ".######."]);
    }

    #[test]
    fn masks_that_do_not_fit_are_refused_with_the_point() {
        let three = |p: [f64; 2]| vec![[0.0, 0.0], [1.0, 0.0], p];
        assert_eq!(
            Mask::new(None, vec![[0.0, 0.0], [1.0, 1.0]], Fill::Black),
            Err(MaskError::PointCount { points: 2 })
        );
        assert_eq!(Mask::new(None, vec![], Fill::Black), Err(MaskError::PointCount { points: 0 }));
        assert_eq!(
            Mask::new(None, three([0.5, 1.2]), Fill::Black),
            Err(MaskError::OutsideFrame { number: 3, x: 0.5, y: 1.2 })
        );
        assert!(matches!(
            Mask::new(None, three([f64::NAN, 0.5]), Fill::Black),
            Err(MaskError::OutsideFrame { number: 3, .. })
        ));
        assert_eq!(Mask::new(None, three([0.5, 0.0]), Fill::Black), Err(MaskError::NoArea));
        let text = MaskError::OutsideFrame { number: 3, x: 0.5, y: 1.2 }.to_string();
        assert!(text.contains("point 3 [0.5, 1.2]") && text.contains("0.0 to 1.0"), "{text}");
    }

    #[test]
    fn the_area_is_the_share_of_the_picture_covered() {
        let quarter = mask(&[[0.0, 0.0], [0.5, 0.0], [0.5, 0.5], [0.0, 0.5]], Fill::Black);
        assert!((quarter.area() - 0.25).abs() < 1e-3, "{}", quarter.area());
        let bow = mask(&[[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], Fill::Black);
        assert!((bow.area() - 0.5).abs() < 2e-3, "{}", bow.area());
    }

    #[test]
    fn black_wins_over_pixelate_and_pixelate_averages_each_block() {
        let mut image =
            RgbImage::from_fn(16, 8, |x, _| if x % 2 == 0 { Rgb([200, 100, 0]) } else { Rgb([0, 100, 200]) });
        let all = [[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]];
        let right = [[0.5, 0.0], [1.0, 0.0], [1.0, 1.0], [0.5, 1.0]];
        apply(&mut image, &[mask(&right, Fill::Black), mask(&all, Fill::Pixelate)]);
        for (x, y, px) in image.enumerate_pixels() {
            let expected = if x >= 8 { [0, 0, 0] } else { [100, 100, 100] };
            assert_eq!(px.0, expected, "({x}, {y})");
        }
    }

    #[test]
    fn pixelate_uses_only_covered_pixels_and_leaves_the_rest() {
        let mut image = RgbImage::from_fn(16, 16, |x, y| Rgb([(x * 16) as u8, (y * 16) as u8, 7]));
        let before = image.clone();
        let top_left = [[0.0, 0.0], [0.5, 0.0], [0.5, 0.5], [0.0, 0.5]];
        apply(&mut image, &[mask(&top_left, Fill::Pixelate)]);
        for (x, y, px) in image.enumerate_pixels() {
            if x < 8 && y < 8 {
                // One 8-pixel block: the mean of x*16 and y*16 over 0..8 is 56.
                assert_eq!(px.0, [56, 56, 7], "({x}, {y})");
            } else {
                assert_eq!(px, before.get_pixel(x, y), "({x}, {y}) is outside the mask");
            }
        }
    }

    #[test]
    fn guides_draw_the_outline_in_the_masks_colour() {
        let mut image = RgbImage::new(400, 400);
        let square = mask(&[[0.25, 0.25], [0.75, 0.25], [0.75, 0.75], [0.25, 0.75]], Fill::Black);
        draw_guides(&mut image, &[square]);
        assert_eq!(*image.get_pixel(200, 100), outline_colour(0));
        assert_eq!(*image.get_pixel(100, 200), outline_colour(0));
        assert_eq!(*image.get_pixel(210, 210), Rgb([0, 0, 0]), "the inside is left alone");
        assert_eq!(*image.get_pixel(40, 1), Rgb([255, 255, 255]), "the grid at a tenth");
    }
}
