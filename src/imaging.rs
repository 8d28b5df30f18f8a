//! Frame validation and the on-board image path: check a camera frame is a complete, sane JPEG,
//! decode it, bake in the EXIF orientation, refuse blank frames, shrink it so the long edge fits,
//! and re-encode it with no identifying metadata. Pure functions over bytes and pixels: no files,
//! no clock.
//!
//! The steps are separate public functions (`check_complete`, `decode_at`, `orient`,
//! `check_not_blank`, `quality::score`, `fit`, `resize`, `mask::apply`, `encode`) so each can be
//! measured and replaced on its own; `process_for` chains them for the capture path, with a
//! camera's quality thresholds and privacy masks (`CameraImaging`). Decoding and encoding go
//! through libjpeg-turbo (`libjpeg`), which can decode straight to a fraction of the stored size.

mod libjpeg;
pub mod mask;
pub mod quality;

use fast_image_resize as fr;
use image::{DynamicImage, RgbImage};

pub use image::metadata::Orientation;
pub use mask::{Fill, Mask, MaskError};
pub use quality::{Quality, QualityScores, QualityThresholds};

/// Frames narrower or shorter than this are refused: no inspection camera makes them.
pub const MIN_SIDE: u32 = 16;
/// Frames wider or taller than this are refused before any pixel is decoded.
pub const MAX_SIDE: u32 = 16_384;
/// Frames with more pixels than this (100 megapixels) are refused before any pixel is decoded.
pub const MAX_PIXELS: u64 = 100_000_000;
/// Bytes of 0x00/0xFF padding tolerated after the end-of-image marker (some cameras pad frames).
pub const MAX_TRAILING_PADDING: usize = 4096;
/// A frame whose luminance standard deviation over the sample grid is below this (in 8-bit
/// levels, tenths) is blank: a lens cap, a dead sensor or a flat grey buffer. Real photos in the
/// test set, dark and low-contrast ones included, are at 20 levels or more.
pub const BLANK_LUMA_STDDEV_TENTHS: u32 = 20;
/// Points per side of the grid `check_not_blank` samples.
pub const BLANK_SAMPLE_GRID: u32 = 64;
/// A frame with a band along one edge, this many eighths of the frame or more, that is exactly
/// the decoder's mid-grey fill (RGB 128,128,128) on every sample point lost its image data there.
/// (The decoder fills the rest of the stored frame from the first garbled block on; which edge
/// that is after orientation depends on the orientation.)
pub const LOST_BAND_EIGHTHS: u32 = 1;
/// The colour the decoder paints where it could not read the compressed data.
const DECODER_FILL: [u8; 3] = [128, 128, 128];

/// How final images are made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResizeSpec {
    /// Longest edge of the final image in pixels; smaller frames are never upscaled.
    pub max_long_edge: u32,
    /// JPEG quality, 1–100.
    pub jpeg_quality: u8,
}

/// What the frame's own header says, before any pixel is decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// Width as stored in the file (before orientation).
    pub width: u32,
    /// Height as stored in the file (before orientation).
    pub height: u32,
}

/// What one camera's frames get besides the bay-wide `ResizeSpec`: the quality gate's
/// thresholds and the privacy masks.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct CameraImaging {
    pub quality: QualityThresholds,
    /// Filled into every final image of the camera, in this order (pixelated ones first and
    /// black ones last, so black wins where they overlap).
    pub masks: Vec<Mask>,
}

/// A frame ready for the buffer.
#[derive(Debug, Clone, PartialEq)]
pub struct Processed {
    /// The final JPEG: upright, resized, masked, no metadata.
    pub jpeg: Vec<u8>,
    /// Upright size of the camera's frame (after orientation, before resizing).
    pub source_width: u32,
    pub source_height: u32,
    /// Size of the final image.
    pub width: u32,
    pub height: u32,
    /// The quality gate's scores and verdict. A poor frame is still a good JPEG: whether to
    /// shoot again is the caller's choice.
    pub quality: Quality,
}

/// Decoded pixels of a frame, as stored (not yet upright), with the EXIF orientation that says
/// how to make them upright.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decoded {
    /// RGB pixels as stored in the file; grayscale and CMYK frames are converted to RGB.
    pub image: RgbImage,
    /// EXIF orientation; a missing or invalid value (such as 0) is `NoTransforms`.
    pub orientation: Orientation,
}

/// Why a frame was refused. `is_retryable` says whether a re-capture can help: cameras deliver
/// a cut-short or garbled frame now and then and the next one is usually fine, but a camera set
/// to an unsupported encoding or resolution sends the same kind of frame every time.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The frame has no bytes at all. Retryable.
    #[error("frame is empty (0 bytes): the camera delivered nothing; re-capture")]
    Empty,
    /// The frame does not start with the JPEG start-of-image marker: the camera sent something
    /// else, or its stream lost sync. Retryable (a stream glitch passes; a camera that is not
    /// set to MJPEG/JPEG fails every time).
    #[error(
        "frame of {bytes} bytes does not start with the JPEG start-of-image marker (FF D8) but with \
         {start}: the camera sent something other than a JPEG; re-capture, and if it persists set \
         the camera to MJPEG/JPEG output"
    )]
    NotJpeg {
        /// Length of the frame.
        bytes: usize,
        /// The first bytes, in hex.
        start: String,
    },
    /// The frame does not end with the end-of-image marker: it was cut short in transfer.
    /// Retryable.
    #[error(
        "frame of {bytes} bytes ends without the JPEG end-of-image marker (FF D9) (last bytes \
         {end}): the camera delivered it cut short; re-capture"
    )]
    Truncated {
        /// Length of the frame.
        bytes: usize,
        /// The last bytes, in hex.
        end: String,
    },
    /// The marker segments before the image data are broken (a segment length that runs past
    /// the end, no frame header, no scan). Retryable: usually a garbled transfer.
    #[error("frame header is malformed at byte {offset} of {bytes}: {problem}; re-capture")]
    Malformed {
        /// Where in the frame the problem was found.
        offset: usize,
        /// Length of the frame.
        bytes: usize,
        /// What is wrong.
        problem: String,
    },
    /// The frame header declares a width or height of 0 (a height that would follow in a DNL
    /// marker, which is not supported, or a corrupt header). Not retryable: a camera that uses
    /// DNL does so on every frame.
    #[error(
        "frame header declares {width}x{height} pixels: a zero side is unsupported (height \
         deferred to a DNL marker) or corrupt; set the camera to plain baseline JPEG"
    )]
    ZeroDimension {
        /// Width from the frame header.
        width: u32,
        /// Height from the frame header.
        height: u32,
    },
    /// The frame is smaller than any camera frame. Not retryable: it is the camera's setting.
    #[error(
        "frame is {width}x{height} pixels, below the minimum of {MIN_SIDE} pixels a side: not a \
         camera frame; set the camera to its normal resolution"
    )]
    TooSmall {
        /// Width from the frame header.
        width: u32,
        /// Height from the frame header.
        height: u32,
    },
    /// The frame is larger than the kiosk will decode; refused before any pixel is allocated.
    /// Not retryable: it is the camera's setting (or a decompression bomb).
    #[error(
        "frame is {width}x{height} pixels ({megapixels} megapixels), above the limit of \
         {MAX_SIDE} pixels a side and {} megapixels; refused before decoding: set the camera to a \
         smaller resolution", MAX_PIXELS / 1_000_000
    )]
    TooLarge {
        /// Width from the frame header.
        width: u32,
        /// Height from the frame header.
        height: u32,
        /// Pixel count in whole megapixels, rounded down.
        megapixels: u64,
    },
    /// The frame uses a JPEG encoding the decoder cannot handle (lossless, arithmetic coding,
    /// hierarchical, 12-bit samples, an unusual component count). Not retryable: the camera
    /// encodes every frame the same way.
    #[error(
        "frame uses {encoding}, which the JPEG decoder does not support: set the camera to \
         baseline or progressive 8-bit JPEG"
    )]
    Unsupported {
        /// What the frame uses.
        encoding: String,
    },
    /// The decoder failed on the compressed image data. Retryable: usually a garbled transfer.
    #[error("frame of {bytes} bytes could not be decoded: {reason}; re-capture")]
    Undecodable {
        /// Length of the frame.
        bytes: usize,
        /// The decoder's own words.
        reason: String,
    },
    /// The frame is blank or one colour: a lens cap, a dead sensor, a flat grey buffer.
    /// Retryable (a buffer glitch passes; a capped lens does not, which the retry limit catches).
    #[error(
        "frame is blank (a single colour): luminance varies by only {}.{} levels around a mean of \
         {mean_luma} (standard deviation over a {BLANK_SAMPLE_GRID}x{BLANK_SAMPLE_GRID} grid), \
         below {}.{}; check the lens is uncovered and the camera works, then re-capture",
        .stddev_tenths / 10, .stddev_tenths % 10,
        BLANK_LUMA_STDDEV_TENTHS / 10, BLANK_LUMA_STDDEV_TENTHS % 10
    )]
    Blank {
        /// Mean luminance, 0–255.
        mean_luma: u8,
        /// Luminance standard deviation in tenths of a level.
        stddev_tenths: u32,
    },
    /// A band along one edge of the frame is the decoder's flat mid-grey fill: the compressed
    /// data there was garbled (a broken restart marker, a bad Huffman code) and the decoder
    /// filled the rest of the frame without an error. Retryable.
    #[error(
        "{lost_percent}% of the frame, along one edge, is flat mid-grey (RGB 128,128,128): the \
         decoder could not read the image data there, so the frame was garbled in transfer; \
         re-capture"
    )]
    PartlyLost {
        /// How much of the frame's height or width is fill, in percent (rounded down).
        lost_percent: u32,
    },
    /// The JPEG quality asked for is outside 1–100. Not retryable: a configuration error.
    #[error("JPEG quality {quality} is out of range: use 1 to 100")]
    InvalidQuality {
        /// The quality asked for.
        quality: u8,
    },
    /// Resizing failed (a zero or mismatched size). Not retryable: a bug in the caller.
    #[error("cannot resize {from_width}x{from_height} to {to_width}x{to_height} pixels: {reason}")]
    ResizeFailed {
        /// Source width.
        from_width: u32,
        /// Source height.
        from_height: u32,
        /// Target width.
        to_width: u32,
        /// Target height.
        to_height: u32,
        /// What went wrong.
        reason: String,
    },
    /// The JPEG encoder refused the image (JPEG allows 1 to 65535 pixels a side). Not retryable.
    #[error("cannot encode a {width}x{height} image as JPEG: {reason}")]
    EncodeFailed {
        /// Image width.
        width: u32,
        /// Image height.
        height: u32,
        /// The encoder's own words.
        reason: String,
    },
}

impl FrameError {
    /// Whether capturing the frame again can help: true for frames that were cut short,
    /// garbled or blank; false for the camera's encoding or resolution and for our own settings.
    pub fn is_retryable(&self) -> bool {
        match self {
            FrameError::Empty
            | FrameError::NotJpeg { .. }
            | FrameError::Truncated { .. }
            | FrameError::Malformed { .. }
            | FrameError::Undecodable { .. }
            | FrameError::Blank { .. }
            | FrameError::PartlyLost { .. } => true,
            FrameError::ZeroDimension { .. }
            | FrameError::TooSmall { .. }
            | FrameError::TooLarge { .. }
            | FrameError::Unsupported { .. }
            | FrameError::InvalidQuality { .. }
            | FrameError::ResizeFailed { .. }
            | FrameError::EncodeFailed { .. } => false,
        }
    }
}

/// Checks, from the bytes alone and without decoding pixels, that `raw` is a complete JPEG the
/// decoder can handle and whose size is sane: it starts with SOI, ends with EOI (allowing up to
/// `MAX_TRAILING_PADDING` bytes of 0x00/0xFF after it), its marker segments are well formed up
/// to the first scan, and the frame header declares a supported encoding of 8-bit samples and a
/// size within `MIN_SIDE`..=`MAX_SIDE` a side and at most `MAX_PIXELS`.
pub fn check_complete(raw: &[u8]) -> Result<FrameHeader, FrameError> {
    if raw.is_empty() {
        return Err(FrameError::Empty);
    }
    if !raw.starts_with(&[0xFF, 0xD8]) {
        return Err(FrameError::NotJpeg { bytes: raw.len(), start: hex(raw.get(..4).unwrap_or(raw)) });
    }
    if !ends_with_eoi(raw) {
        let tail = raw.get(raw.len().saturating_sub(4)..).unwrap_or(raw);
        return Err(FrameError::Truncated { bytes: raw.len(), end: hex(tail) });
    }
    let sof = find_frame_header(raw)?;
    check_frame_header(&sof)?;
    Ok(FrameHeader { width: sof.width, height: sof.height })
}

/// Decodes a JPEG to RGB pixels as stored, at full size, and reads its EXIF orientation. The
/// size from the header must pass the same limits as `check_complete` (`MAX_SIDE` a side and
/// `MAX_PIXELS`) before any pixel is decoded, so a hostile header cannot make it allocate more;
/// call `check_complete` first to catch cut-short frames.
pub fn decode(raw: &[u8]) -> Result<Decoded, FrameError> {
    decode_at(raw, 8)
}

/// The smallest scale, in eighths, at which libjpeg decodes a `width`x`height` frame (it rounds
/// each side up) to at least `min_width`x`min_height`: 8 when the frame is not larger.
pub fn decode_scale(width: u32, height: u32, min_width: u32, min_height: u32) -> u8 {
    let at = |side: u32, eighths: u32| (u64::from(side) * u64::from(eighths)).div_ceil(8);
    (1..=8u8)
        .find(|&n| {
            at(width, n.into()) >= u64::from(min_width) && at(height, n.into()) >= u64::from(min_height)
        })
        .unwrap_or(8)
}

/// Decodes like `decode`, but at `eighths`/8 (1..=8) of the stored size: libjpeg drops DCT
/// coefficients instead of decoding pixels that a resize would throw away. `decode_scale` says
/// how small it may go.
pub fn decode_at(raw: &[u8], eighths: u8) -> Result<Decoded, FrameError> {
    decode_eighths(raw, eighths).map(|(decoded, _)| decoded)
}

/// `decode_at`, also returning the stored size.
fn decode_eighths(raw: &[u8], eighths: u8) -> Result<(Decoded, FrameHeader), FrameError> {
    match libjpeg::decode(raw, eighths, check_size) {
        Ok(p) => Ok((
            Decoded { image: p.image, orientation: p.orientation },
            FrameHeader { width: p.stored_width, height: p.stored_height },
        )),
        Err(libjpeg::DecodeFailure::Refused(e)) => Err(e),
        Err(libjpeg::DecodeFailure::Failed(e)) => {
            Err(FrameError::Undecodable { bytes: raw.len(), reason: e.to_string() })
        }
    }
}

/// Turns stored pixels upright according to their EXIF orientation (all eight values).
pub fn orient(image: RgbImage, orientation: Orientation) -> RgbImage {
    if orientation == Orientation::NoTransforms {
        return image;
    }
    let mut dynamic = DynamicImage::ImageRgb8(image);
    dynamic.apply_orientation(orientation);
    dynamic.into_rgb8()
}

/// Refuses a blank frame: one whose luminance barely varies over a `BLANK_SAMPLE_GRID` grid of
/// sample points (a lens cap, a dead sensor, a flat grey buffer); dark and low-contrast photos
/// still vary by far more than `BLANK_LUMA_STDDEV_TENTHS`. Also refuses a frame with a band
/// along one edge, `LOST_BAND_EIGHTHS` of the frame or more, that is exactly the decoder's
/// mid-grey fill on every sample point: the decoder met garbled data and filled the rest of the
/// frame without an error.
pub fn check_not_blank(image: &RgbImage) -> Result<(), FrameError> {
    let grid = SampleGrid::over(image);
    let (mean, variance) = luma_statistics(image, &grid);
    let stddev_tenths = (variance.sqrt() * 10.0).round() as u32;
    if stddev_tenths < BLANK_LUMA_STDDEV_TENTHS {
        return Err(FrameError::Blank { mean_luma: mean.round().clamp(0.0, 255.0) as u8, stddev_tenths });
    }
    let fill_row = |y: u32| grid.columns().all(|x| is_fill(image, x, y));
    let fill_column = |x: u32| grid.rows().all(|y| is_fill(image, x, y));
    let bands = [
        (grid.rows().rev().take_while(|&y| fill_row(y)).count(), grid.rows_n),
        (grid.rows().take_while(|&y| fill_row(y)).count(), grid.rows_n),
        (grid.columns().take_while(|&x| fill_column(x)).count(), grid.columns_n),
        (grid.columns().rev().take_while(|&x| fill_column(x)).count(), grid.columns_n),
    ];
    for (lines, of) in bands {
        let lines = u32::try_from(lines).unwrap_or(u32::MAX);
        if lines > 0 && u64::from(lines) * 8 >= u64::from(of) * u64::from(LOST_BAND_EIGHTHS) {
            return Err(FrameError::PartlyLost { lost_percent: lines.saturating_mul(100) / of.max(1) });
        }
    }
    Ok(())
}

/// The size an image of `width`x`height` gets so that its long edge is at most `max_long_edge`:
/// never larger than the original, the same aspect ratio to within one pixel (rounded to
/// nearest), the long edge exactly `max_long_edge` when shrinking, and never 0 (a 0 input or
/// limit counts as 1).
pub fn fit(width: u32, height: u32, max_long_edge: u32) -> (u32, u32) {
    let (width, height, limit) = (width.max(1), height.max(1), max_long_edge.max(1));
    let long = width.max(height);
    if long <= limit {
        return (width, height);
    }
    let scale = |short: u32| -> u32 {
        let scaled = (u64::from(short) * u64::from(limit) + u64::from(long) / 2) / u64::from(long);
        u32::try_from(scaled).unwrap_or(limit).clamp(1, limit)
    };
    if width >= height {
        (limit, scale(height))
    } else {
        (scale(width), limit)
    }
}

/// Resizes to exactly `width`x`height` with a Lanczos3 convolution (sharp, little aliasing when
/// shrinking).
pub fn resize(image: &RgbImage, width: u32, height: u32) -> Result<RgbImage, FrameError> {
    let failed = |reason: String| FrameError::ResizeFailed {
        from_width: image.width(),
        from_height: image.height(),
        to_width: width,
        to_height: height,
        reason,
    };
    if image.width() == 0 || image.height() == 0 || width == 0 || height == 0 {
        return Err(failed("a side is 0 pixels".to_owned()));
    }
    let src = fr::images::ImageRef::new(image.width(), image.height(), image.as_raw(), fr::PixelType::U8x3)
        .map_err(|e| failed(e.to_string()))?;
    let mut dst = fr::images::Image::new(width, height, fr::PixelType::U8x3);
    let options = fr::ResizeOptions::new().resize_alg(fr::ResizeAlg::Convolution(fr::FilterType::Lanczos3));
    fr::Resizer::new().resize(&src, &mut dst, &options).map_err(|e| failed(e.to_string()))?;
    RgbImage::from_raw(width, height, dst.into_vec())
        .ok_or_else(|| failed("the resizer returned a buffer of the wrong size".to_owned()))
}

/// `resize` of an image it owns, in two passes: the height first into an image as wide as the
/// source, which frees the source, then the width. The same pixels as `resize` (which makes the
/// same two passes), but the source, the intermediate and the result are never all alive at
/// once.
fn shrink(image: RgbImage, width: u32, height: u32) -> Result<RgbImage, FrameError> {
    if image.width() == width || image.height() == height {
        return resize(&image, width, height);
    }
    let tall = resize(&image, image.width(), height)?;
    drop(image);
    resize(&tall, width, height)
}

/// Encodes RGB pixels as a baseline JPEG at `quality` (1–100), 4:2:0 chroma, with the standard
/// Huffman tables (so the encoder streams: no whole-image coefficient buffer). The output carries no metadata: no EXIF (so no GPS, maker notes
/// or orientation), no ICC profile, no comment; only the JFIF header every JPEG reader expects.
pub fn encode(img: &RgbImage, quality: u8) -> Result<Vec<u8>, FrameError> {
    if !(1..=100).contains(&quality) {
        return Err(FrameError::InvalidQuality { quality });
    }
    let (width, height) = img.dimensions();
    if width == 0 || height == 0 || width > 65_535 || height > 65_535 {
        return Err(FrameError::EncodeFailed {
            width,
            height,
            reason: "JPEG allows 1 to 65535 pixels a side".into(),
        });
    }
    libjpeg::encode(img, quality).map_err(|e| FrameError::EncodeFailed {
        width,
        height,
        reason: e.to_string(),
    })
}

/// Encodes, as a camera's own encoder does (baseline, 4:2:0, the standard Huffman tables), an
/// image of `width`x`height` that is never whole in memory: `fill` writes it a band of rows at
/// a time (called with the band's first row and a buffer of whole RGB rows, the last band
/// possibly shorter). For frames made on the board, such as the synthetic camera's.
pub fn encode_bands(
    width: u32,
    height: u32,
    quality: u8,
    mut fill: impl FnMut(u32, &mut [u8]),
) -> Result<Vec<u8>, FrameError> {
    /// Rows per band: a multiple of the tallest MCU (16 rows at 4:2:0).
    const BAND_ROWS: u32 = 64;
    if !(1..=100).contains(&quality) {
        return Err(FrameError::InvalidQuality { quality });
    }
    if width == 0 || height == 0 || width > 65_535 || height > 65_535 {
        return Err(FrameError::EncodeFailed {
            width,
            height,
            reason: "JPEG allows 1 to 65535 pixels a side".into(),
        });
    }
    libjpeg::encode_bands(width, height, quality, BAND_ROWS, &mut fill)
        .map_err(|e| FrameError::EncodeFailed { width, height, reason: e.to_string() })
}

/// `process_for` with the default quality thresholds and no masks.
pub fn process(raw: &[u8], spec: &ResizeSpec) -> Result<Processed, FrameError> {
    process_for(raw, spec, &CameraImaging::default())
}

/// The capture path: `check_complete`; `decode` at the smallest scale that still covers the
/// final size (`decode_scale`); `orient`; `check_not_blank`; the quality gate's `score` on
/// those same pixels (what the masks cover left out) and `judge`; `fit` and `resize` (only when
/// the decoded frame is larger than the final size); `mask::apply`; `encode`. The only pixels
/// ever encoded are masked ones.
pub fn process_for(raw: &[u8], spec: &ResizeSpec, camera: &CameraImaging) -> Result<Processed, FrameError> {
    let (image, mut processed) = develop(raw, spec, camera)?;
    processed.jpeg = encode(&image, spec.jpeg_quality)?;
    Ok(processed)
}

/// `process_for` on a frame it owns: the camera's bytes are freed as soon as they are decoded,
/// and the decoded pixels as soon as they are resized, so that only one full-size buffer of a
/// frame is alive at any step (what keeps the peak memory of a bay of large frames low).
pub fn process_owned(
    raw: Vec<u8>,
    spec: &ResizeSpec,
    camera: &CameraImaging,
) -> Result<Processed, FrameError> {
    let (image, mut processed) = develop(raw, spec, camera)?;
    processed.jpeg = encode(&image, spec.jpeg_quality)?;
    Ok(processed)
}

/// `process_for`, plus a preview for the installer: the final image (masks filled in, as it
/// is stored) with a dotted grid every tenth of the width and height and each mask's outline in
/// its colour (`mask::outline_colour_name`), encoded at `spec.jpeg_quality`.
pub fn preview(
    raw: &[u8],
    spec: &ResizeSpec,
    camera: &CameraImaging,
) -> Result<(Processed, Vec<u8>), FrameError> {
    let (mut image, mut processed) = develop(raw, spec, camera)?;
    processed.jpeg = encode(&image, spec.jpeg_quality)?;
    mask::draw_guides(&mut image, &camera.masks);
    let guides = encode(&image, spec.jpeg_quality)?;
    Ok((processed, guides))
}

/// Everything of `process_for` but the encoding: the final, masked pixels, and the rest of
/// `Processed` (with an empty `jpeg`).
/// An owned `raw` is dropped once decoded, the decoded pixels once resized.
fn develop(
    raw: impl AsRef<[u8]>,
    spec: &ResizeSpec,
    camera: &CameraImaging,
) -> Result<(RgbImage, Processed), FrameError> {
    if !(1..=100).contains(&spec.jpeg_quality) {
        return Err(FrameError::InvalidQuality { quality: spec.jpeg_quality });
    }
    let header = check_complete(raw.as_ref())?;
    // `fit` treats both sides alike, so the final size as stored is the upright one turned.
    let (stored_w, stored_h) = fit(header.width, header.height, spec.max_long_edge);
    let (decoded, stored) =
        decode_eighths(raw.as_ref(), decode_scale(header.width, header.height, stored_w, stored_h))?;
    drop(raw);
    let upright = orient(decoded.image, decoded.orientation);
    check_not_blank(&upright)?;
    let masked = mask::Raster::new(&camera.masks, upright.width(), upright.height());
    let quality = quality::judge(quality::score(&upright, &masked), &camera.quality);
    let (source_width, source_height) = if turns_sideways(decoded.orientation) {
        (stored.height, stored.width)
    } else {
        (stored.width, stored.height)
    };
    let (width, height) = fit(source_width, source_height, spec.max_long_edge);
    let mut image =
        if upright.dimensions() == (width, height) { upright } else { shrink(upright, width, height)? };
    mask::apply(&mut image, &camera.masks);
    Ok((image, Processed { jpeg: Vec::new(), source_width, source_height, width, height, quality }))
}

/// Whether an EXIF orientation swaps width and height.
fn turns_sideways(orientation: Orientation) -> bool {
    matches!(
        orientation,
        Orientation::Rotate90
            | Orientation::Rotate270
            | Orientation::Rotate90FlipH
            | Orientation::Rotate270FlipH
    )
}

/// The frame header (SOF) fields `check_complete` judges.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct StartOfFrame {
    /// The low nibble of the SOF marker: 0 baseline, 1 extended, 2 progressive, 3 lossless...
    kind: u8,
    precision: u8,
    width: u32,
    height: u32,
    components: u8,
}

/// Whether `raw` ends with FF D9, allowing some 0x00/0xFF padding after it.
fn ends_with_eoi(raw: &[u8]) -> bool {
    let padding =
        raw.iter().rev().take(MAX_TRAILING_PADDING + 1).take_while(|&&b| b == 0x00 || b == 0xFF).count();
    if padding > MAX_TRAILING_PADDING {
        return false;
    }
    let end = raw.len() - padding;
    end >= 2 && raw.get(end - 2..end) == Some(&[0xFF, 0xD9][..])
}

/// Walks the marker segments from SOI to the first SOS, as the decoder does (fill bytes and
/// stray bytes between segments are skipped), and returns the frame header.
fn find_frame_header(raw: &[u8]) -> Result<StartOfFrame, FrameError> {
    let malformed =
        |offset: usize, problem: String| FrameError::Malformed { offset, bytes: raw.len(), problem };
    let mut sof: Option<StartOfFrame> = None;
    let mut pos = 2;
    loop {
        let Some(marker_at) = next_marker(raw, pos) else {
            let problem = if sof.is_some() {
                "no scan (SOS) follows the frame header"
            } else {
                "no frame header (SOF) found"
            };
            return Err(malformed(raw.len(), problem.to_owned()));
        };
        let marker = raw.get(marker_at + 1).copied().unwrap_or(0);
        match marker {
            0xD9 => {
                let problem = if sof.is_some() {
                    "end-of-image marker before any scan (SOS): the frame holds no image data"
                } else {
                    "end-of-image marker before any frame header (SOF): the frame holds no image"
                };
                return Err(malformed(marker_at, problem.to_owned()));
            }
            0xD8 => return Err(malformed(marker_at, "a second start-of-image marker (FF D8)".to_owned())),
            // Standalone markers without a length: TEM and RST0-7.
            0x01 | 0xD0..=0xD7 => {
                pos = marker_at + 2;
                continue;
            }
            _ => {}
        }
        let length = match raw.get(marker_at + 2..marker_at + 4) {
            Some(&[hi, lo]) => usize::from(u16::from_be_bytes([hi, lo])),
            _ => {
                return Err(malformed(
                    marker_at,
                    format!("segment FF {marker:02X} is cut off before its length"),
                ))
            }
        };
        let body_end = marker_at + 2 + length;
        if length < 2 || body_end > raw.len() {
            return Err(malformed(
                marker_at,
                format!(
                    "segment FF {marker:02X} declares a bogus length of {length} bytes ({} remain)",
                    raw.len() - marker_at - 2
                ),
            ));
        }
        let body = raw.get(marker_at + 4..body_end).unwrap_or(&[]);
        match marker {
            0xC0..=0xCF if !matches!(marker, 0xC4 | 0xC8 | 0xCC) => {
                if sof.is_some() {
                    return Err(malformed(marker_at, "a second frame header (SOF)".to_owned()));
                }
                sof = Some(parse_sof(marker & 0x0F, body).ok_or_else(|| {
                    malformed(marker_at, format!("frame header (SOF) of {length} bytes is too short"))
                })?);
            }
            0xCC => {
                return Err(FrameError::Unsupported { encoding: "arithmetic coding (DAC marker)".to_owned() })
            }
            0xDA => {
                return sof.ok_or_else(|| {
                    malformed(marker_at, "a scan (SOS) before any frame header (SOF)".to_owned())
                });
            }
            _ => {}
        }
        pos = body_end;
    }
}

/// The offset of the next marker (an 0xFF followed by a byte that is neither 0x00 nor 0xFF) at or
/// after `from`.
fn next_marker(raw: &[u8], from: usize) -> Option<usize> {
    let rest = raw.get(from..)?;
    rest.windows(2).position(|w| matches!(w, [0xFF, m] if *m != 0x00 && *m != 0xFF)).map(|i| from + i)
}

/// Reads precision, size and component count from a SOF segment body.
fn parse_sof(kind: u8, body: &[u8]) -> Option<StartOfFrame> {
    let (&precision, rest) = body.split_first()?;
    let height = u32::from(u16::from_be_bytes([*rest.first()?, *rest.get(1)?]));
    let width = u32::from(u16::from_be_bytes([*rest.get(2)?, *rest.get(3)?]));
    let components = *rest.get(4)?;
    if rest.len() < 5 + 3 * usize::from(components) {
        return None;
    }
    Some(StartOfFrame { kind, precision, width, height, components })
}

/// Refuses encodings the decoder cannot handle, then sizes out of range.
fn check_frame_header(sof: &StartOfFrame) -> Result<(), FrameError> {
    let unsupported = |encoding: String| Err(FrameError::Unsupported { encoding });
    match sof.kind {
        0..=2 => {}
        3 => return unsupported("lossless JPEG (SOF3)".to_owned()),
        5..=7 => return unsupported(format!("hierarchical (differential) JPEG (SOF{})", sof.kind)),
        kind => return unsupported(format!("arithmetic-coded JPEG (SOF{kind})")),
    }
    if sof.precision != 8 {
        return unsupported(format!("{}-bit samples", sof.precision));
    }
    if !matches!(sof.components, 1 | 3 | 4) {
        return unsupported(format!("{} colour components (only 1, 3 or 4 are supported)", sof.components));
    }
    check_size(sof.width, sof.height)
}

/// Refuses a zero side, a frame below `MIN_SIDE` or above `MAX_SIDE`/`MAX_PIXELS`.
fn check_size(width: u32, height: u32) -> Result<(), FrameError> {
    if width == 0 || height == 0 {
        return Err(FrameError::ZeroDimension { width, height });
    }
    let pixels = u64::from(width) * u64::from(height);
    if width > MAX_SIDE || height > MAX_SIDE || pixels > MAX_PIXELS {
        return Err(FrameError::TooLarge { width, height, megapixels: pixels / 1_000_000 });
    }
    if width < MIN_SIDE || height < MIN_SIDE {
        return Err(FrameError::TooSmall { width, height });
    }
    Ok(())
}

/// A grid of up to `BLANK_SAMPLE_GRID` x `BLANK_SAMPLE_GRID` points at the centres of equal
/// cells of an image.
struct SampleGrid {
    width: u32,
    height: u32,
    columns_n: u32,
    rows_n: u32,
}

impl SampleGrid {
    fn over(image: &RgbImage) -> SampleGrid {
        let (width, height) = image.dimensions();
        SampleGrid {
            width,
            height,
            columns_n: BLANK_SAMPLE_GRID.min(width),
            rows_n: BLANK_SAMPLE_GRID.min(height),
        }
    }

    /// The x of every sample column, left to right.
    fn columns(&self) -> impl DoubleEndedIterator<Item = u32> + '_ {
        (0..self.columns_n).map(|i| cell_centre(i, self.columns_n, self.width))
    }

    /// The y of every sample row, top to bottom.
    fn rows(&self) -> impl DoubleEndedIterator<Item = u32> + '_ {
        (0..self.rows_n).map(|j| cell_centre(j, self.rows_n, self.height))
    }
}

/// The centre of cell `i` of `cells` equal cells over `extent` pixels; below `extent` when
/// `i < cells`.
fn cell_centre(i: u32, cells: u32, extent: u32) -> u32 {
    let centre = (2 * u64::from(i) + 1) * u64::from(extent) / (2 * u64::from(cells).max(1));
    u32::try_from(centre).unwrap_or(u32::MAX)
}

/// Whether the pixel at (x, y) is the decoder's fill colour.
fn is_fill(image: &RgbImage, x: u32, y: u32) -> bool {
    image.get_pixel_checked(x, y).is_some_and(|p| p.0 == DECODER_FILL)
}

/// Mean and variance of the luminance (BT.601 weights) over the sample grid.
fn luma_statistics(image: &RgbImage, grid: &SampleGrid) -> (f64, f64) {
    let (mut count, mut sum, mut sum_sq) = (0u64, 0u64, 0u64);
    for y in grid.rows() {
        for x in grid.columns() {
            if let Some(p) = image.get_pixel_checked(x, y) {
                let [r, g, b] = p.0;
                let luma = (299 * u64::from(r) + 587 * u64::from(g) + 114 * u64::from(b) + 500) / 1000;
                count += 1;
                sum += luma;
                sum_sq += luma * luma;
            }
        }
    }
    if count == 0 {
        return (0.0, 0.0);
    }
    let n = count as f64;
    let mean = sum as f64 / n;
    (mean, (sum_sq as f64 / n - mean * mean).max(0.0))
}

/// Bytes as spaced upper-case hex: "FF D8 FF E0".
fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02X}")).collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::Rgb;
    use proptest::prelude::*;

    // ----- shrink -----

    #[test]
    fn shrinking_in_two_passes_gives_the_pixels_of_one_resize() {
        let mut image = RgbImage::new(403, 301);
        for (x, y, p) in image.enumerate_pixels_mut() {
            *p = Rgb([(x * 7 % 256) as u8, (y * 13 % 256) as u8, ((x ^ y) % 256) as u8]);
        }
        for (w, h) in [(192, 143), (400, 120), (100, 301), (403, 50)] {
            let one = resize(&image, w, h).unwrap();
            let two = shrink(image.clone(), w, h).unwrap();
            assert!(one == two, "{w}x{h}: the two-pass result differs");
        }
    }

    // ----- fit -----

    fn check_fit(width: u32, height: u32, max_long_edge: u32, expected: (u32, u32)) {
        assert_eq!(fit(width, height, max_long_edge), expected, "fit({width}, {height}, {max_long_edge})");
    }

    #[test]
    fn fit_shrinks_the_long_edge_to_the_limit_and_keeps_the_aspect_ratio() {
        check_fit(4000, 3000, 1920, (1920, 1440)); // landscape
        check_fit(3000, 4000, 1920, (1440, 1920)); // portrait
        check_fit(5000, 5000, 1920, (1920, 1920)); // square
        check_fit(4928, 3264, 1920, (1920, 1272)); // 1271.7 rounds to nearest
        check_fit(4128, 2322, 1920, (1920, 1080)); // 16:9 phone
    }

    #[test]
    fn fit_never_upscales() {
        check_fit(800, 600, 1920, (800, 600)); // already small: unchanged
        check_fit(1920, 1080, 1920, (1920, 1080)); // exactly at the limit
        check_fit(1080, 1920, 1920, (1080, 1920));
        check_fit(16, 16, 1920, (16, 16));
    }

    #[test]
    fn fit_never_gives_a_zero_side_even_for_extreme_shapes_and_inputs() {
        check_fit(10_000, 10, 1920, (1920, 2));
        check_fit(100_000, 1, 1920, (1920, 1));
        check_fit(1, 100_000, 1920, (1, 1920));
        check_fit(u32::MAX, 1, 1920, (1920, 1));
        check_fit(u32::MAX, u32::MAX, 1920, (1920, 1920));
        check_fit(0, 0, 1920, (1, 1));
        check_fit(4000, 3000, 0, (1, 1));
    }

    proptest! {
        #[test]
        fn fit_keeps_the_aspect_ratio_within_a_pixel_for_any_size(
            width in 1u32..200_000, height in 1u32..200_000, limit in 1u32..20_000,
        ) {
            let (w, h) = fit(width, height, limit);
            let (long, short) = (width.max(height), width.min(height));
            let (out_long, out_short) = if width >= height { (w, h) } else { (h, w) };
            prop_assert!(w >= 1 && h >= 1);
            prop_assert!(w <= width && h <= height, "upscaled {width}x{height} to {w}x{h}");
            prop_assert_eq!(out_long, long.min(limit));
            // |out_short - short * out_long / long| <= 1, in integers.
            let exact = u64::from(short) * u64::from(out_long);
            let got = u64::from(out_short) * u64::from(long);
            prop_assert!(exact.abs_diff(got) <= u64::from(long), "{width}x{height} -> {w}x{h}");
        }
    }

    #[test]
    fn decode_scale_picks_the_smallest_eighth_that_still_covers_the_final_size() {
        // 12 MP bound for 1920: half size (2016x1512) covers 1920x1440.
        assert_eq!(decode_scale(4032, 3024, 1920, 1440), 4);
        // Exactly half: no resize is left to do.
        assert_eq!(decode_scale(3840, 2160, 1920, 1080), 4);
        // 48 MP: a quarter.
        assert_eq!(decode_scale(8000, 6000, 1920, 1440), 2);
        // Odd sizes round up as libjpeg does: 3/8 of 5121 is 1920.375, so 1921.
        assert_eq!(decode_scale(5121, 3841, 1920, 1440), 3);
        // Not larger than the final size, or asked for more: full size.
        assert_eq!(decode_scale(1920, 1080, 1920, 1080), 8);
        assert_eq!(decode_scale(640, 480, 1920, 1440), 8);
    }

    proptest! {
        #[test]
        fn decode_scale_never_decodes_smaller_than_the_final_size(
            width in 1u32..20_000, height in 1u32..20_000, limit in 1u32..20_000,
        ) {
            let (w, h) = fit(width, height, limit);
            let n = decode_scale(width, height, w, h);
            let at = |side: u32, n: u8| (u64::from(side) * u64::from(n)).div_ceil(8);
            prop_assert!((1..=8).contains(&n));
            prop_assert!(at(width, n) >= u64::from(w) && at(height, n) >= u64::from(h), "{n}/8 of {width}x{height} < {w}x{h}");
            if n > 1 {
                prop_assert!(at(width, n - 1) < u64::from(w) || at(height, n - 1) < u64::from(h), "{} would do", n - 1);
            }
        }
    }

    #[test]
    fn a_large_frame_is_decoded_at_a_fraction_and_still_comes_out_at_the_full_final_size() {
        let raw = encode(&noisy(4032, 3024, 7), 90).expect("encode");
        let (decoded, stored) = decode_eighths(&raw, 4).expect("decode at half size");
        assert_eq!(decoded.image.dimensions(), (2016, 1512));
        assert_eq!((stored.width, stored.height), (4032, 3024));
        let p = process(&raw, &ResizeSpec { max_long_edge: 1920, jpeg_quality: 85 }).expect("process");
        assert_eq!((p.source_width, p.source_height, p.width, p.height), (4032, 3024, 1920, 1440));
        assert_eq!(decode(&p.jpeg).expect("output decodes").image.dimensions(), (1920, 1440));
    }

    // ----- check_complete on hand-made frames -----

    fn segment(marker: u8, body: &[u8]) -> Vec<u8> {
        let length = u16::try_from(body.len() + 2).expect("test segments are small");
        let mut out = vec![0xFF, marker];
        out.extend_from_slice(&length.to_be_bytes());
        out.extend_from_slice(body);
        out
    }

    fn sof(kind: u8, precision: u8, width: u16, height: u16, components: u8) -> Vec<u8> {
        let mut body = vec![precision];
        body.extend_from_slice(&height.to_be_bytes());
        body.extend_from_slice(&width.to_be_bytes());
        body.push(components);
        for id in 1..=components {
            body.extend_from_slice(&[id, 0x11, 0]);
        }
        segment(0xC0 | kind, &body)
    }

    fn sos() -> Vec<u8> {
        segment(0xDA, &[1, 1, 0x00, 0, 63, 0])
    }

    /// SOI, the given segments, a scan with a few bytes of entropy data, EOI.
    fn frame(segments: &[Vec<u8>]) -> Vec<u8> {
        let mut out = vec![0xFF, 0xD8];
        for s in segments {
            out.extend_from_slice(s);
        }
        out.extend_from_slice(&sos());
        out.extend_from_slice(&[0x12, 0x34, 0xFF, 0x00, 0x56]);
        out.extend_from_slice(&[0xFF, 0xD9]);
        out
    }

    fn baseline(width: u16, height: u16) -> Vec<u8> {
        frame(&[segment(0xE0, b"JFIF\0\x01\x01\0\0\x01\0\x01\0\0"), sof(0, 8, width, height, 3)])
    }

    /// The size `check_complete` should read, or a test of the error it should give.
    type Expected = Result<(u32, u32), fn(&FrameError) -> bool>;

    fn check_header(raw: &[u8], expected: Expected) {
        let got = check_complete(raw);
        match (&got, expected) {
            (Ok(header), Ok(size)) => assert_eq!((header.width, header.height), size),
            (Err(e), Err(is_expected)) => assert!(is_expected(e), "unexpected error: {e:?}"),
            _ => panic!("check_complete({:02X?}) gave {got:?}", raw.get(..raw.len().min(32))),
        }
    }

    #[test]
    fn complete_frames_pass_with_the_size_from_their_header() {
        check_header(&baseline(640, 480), Ok((640, 480)));
        check_header(&baseline(16, 16), Ok((16, 16)));
        check_header(&baseline(10_000, 10_000), Ok((10_000, 10_000)));
        check_header(&frame(&[sof(2, 8, 33, 17, 1)]), Ok((33, 17))); // progressive grey
        check_header(&frame(&[sof(1, 8, 100, 50, 4)]), Ok((100, 50))); // extended, CMYK
    }

    #[test]
    fn a_little_padding_after_the_end_marker_is_tolerated_but_not_a_lot() {
        let mut padded = baseline(640, 480);
        padded.extend_from_slice(&[0x00, 0x00, 0xFF, 0xFF, 0x00]);
        check_header(&padded, Ok((640, 480)));
        let mut page = baseline(640, 480);
        page.resize(page.len() + MAX_TRAILING_PADDING, 0x00);
        check_header(&page, Ok((640, 480)));
        page.push(0x00);
        check_header(&page, Err(|e| matches!(e, FrameError::Truncated { .. })));
    }

    #[test]
    fn fill_bytes_and_stray_bytes_between_segments_are_skipped_as_the_decoder_does() {
        let mut raw = vec![0xFF, 0xD8, 0xFF, 0xFF, 0xFF];
        raw.extend_from_slice(segment(0xE0, b"JFIF\0").get(1..).expect("segment has a marker"));
        raw.extend_from_slice(&[0x01, 0x02, 0x03]); // junk before the next marker
        raw.extend_from_slice(frame(&[sof(0, 8, 64, 48, 3)]).get(2..).expect("frame has SOI"));
        check_header(&raw, Ok((64, 48)));
    }

    #[test]
    fn empty_cut_short_and_non_jpeg_frames_are_refused() {
        check_header(&[], Err(|e| *e == FrameError::Empty));
        check_header(&[0xFF], Err(|e| matches!(e, FrameError::NotJpeg { .. })));
        check_header(b"GIF89a\0\0", Err(|e| matches!(e, FrameError::NotJpeg { .. })));
        check_header(&[0xFF, 0xD8], Err(|e| matches!(e, FrameError::Truncated { bytes: 2, .. })));
        let mut cut = baseline(640, 480);
        cut.truncate(cut.len() - 2);
        check_header(&cut, Err(|e| matches!(e, FrameError::Truncated { .. })));
        cut.truncate(30);
        check_header(&cut, Err(|e| matches!(e, FrameError::Truncated { bytes: 30, .. })));
    }

    #[test]
    fn frames_without_a_frame_header_or_a_scan_are_refused_as_malformed() {
        let malformed = |e: &FrameError| matches!(e, FrameError::Malformed { .. });
        check_header(&[0xFF, 0xD8, 0xFF, 0xD9], Err(malformed)); // SOI + EOI only
        check_header(&frame(&[segment(0xDB, &[0; 65])]), Err(malformed)); // scan, no SOF
        let mut no_scan = vec![0xFF, 0xD8];
        no_scan.extend_from_slice(&sof(0, 8, 64, 64, 3));
        no_scan.extend_from_slice(&[0xFF, 0xD9]);
        check_header(&no_scan, Err(malformed));
        check_header(&frame(&[sof(0, 8, 64, 64, 3), sof(0, 8, 64, 64, 3)]), Err(malformed));
        check_header(&frame(&[segment(0xC0, &[8, 0, 64])]), Err(malformed)); // SOF too short
        check_header(&[0xFF, 0xD8, 0xFF, 0xD8, 0xFF, 0xD9], Err(malformed));
    }

    #[test]
    fn bogus_segment_lengths_are_refused_without_reading_out_of_bounds() {
        let malformed = |e: &FrameError| matches!(e, FrameError::Malformed { .. });
        // A length below 2.
        check_header(&[0xFF, 0xD8, 0xFF, 0xE0, 0x00, 0x01, 0xFF, 0xD9], Err(malformed));
        check_header(&[0xFF, 0xD8, 0xFF, 0xE0, 0x00, 0x00, 0xFF, 0xD9], Err(malformed));
        // A length that runs past the end.
        check_header(&[0xFF, 0xD8, 0xFF, 0xE1, 0xFF, 0xFF, 0x00, 0xFF, 0xD9], Err(malformed));
        // The length itself cut off: the EOI is read as the length, which runs past the end.
        check_header(&[0xFF, 0xD8, 0xFF, 0xE0, 0xFF, 0xD9], Err(malformed));
        // A marker right before the EOI with no room for a length.
        check_header(&[0xFF, 0xD8, 0xFF, 0xC0, 0xFF, 0xD9], Err(malformed));
    }

    #[test]
    fn zero_tiny_and_huge_frames_are_refused_from_the_header_alone() {
        check_header(&baseline(640, 0), Err(|e| *e == FrameError::ZeroDimension { width: 640, height: 0 }));
        check_header(&baseline(0, 480), Err(|e| *e == FrameError::ZeroDimension { width: 0, height: 480 }));
        check_header(&baseline(15, 480), Err(|e| *e == FrameError::TooSmall { width: 15, height: 480 }));
        check_header(&baseline(640, 8), Err(|e| *e == FrameError::TooSmall { width: 640, height: 8 }));
        check_header(
            &baseline(16_385, 100),
            Err(|e| matches!(e, FrameError::TooLarge { width: 16_385, .. })),
        );
        check_header(
            &baseline(12_000, 9_000),
            Err(|e| matches!(e, FrameError::TooLarge { megapixels: 108, .. })),
        );
        check_header(
            &baseline(65_535, 65_535),
            Err(|e| matches!(e, FrameError::TooLarge { megapixels: 4294, .. })),
        );
    }

    #[test]
    fn encodings_the_decoder_cannot_handle_are_refused_as_unsupported() {
        let says = |raw: Vec<u8>, words: &str| match check_complete(&raw) {
            Err(e @ FrameError::Unsupported { .. }) => {
                assert!(e.to_string().contains(words), "{e}");
                assert!(!e.is_retryable());
            }
            other => panic!("expected unsupported ({words}), got {other:?}"),
        };
        says(frame(&[sof(3, 8, 64, 64, 1)]), "lossless");
        says(frame(&[sof(5, 8, 64, 64, 1)]), "hierarchical");
        says(frame(&[sof(9, 8, 64, 64, 3)]), "arithmetic");
        says(frame(&[sof(10, 8, 64, 64, 3)]), "arithmetic");
        says(frame(&[segment(0xCC, &[0, 0x10]), sof(0, 8, 64, 64, 3)]), "arithmetic");
        says(frame(&[sof(1, 12, 64, 64, 3)]), "12-bit");
        says(frame(&[sof(0, 8, 64, 64, 2)]), "2 colour components");
    }

    // ----- decode, orient -----

    /// A frame with texture everywhere: every pixel differs from its neighbours.
    fn noisy(width: u32, height: u32, seed: u32) -> RgbImage {
        let mut state = seed | 1;
        RgbImage::from_fn(width, height, |x, y| {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            let base = ((x * 255 / width.max(1)) as u8, (y * 255 / height.max(1)) as u8);
            let n = (state % 40) as u8;
            Rgb([base.0 / 2 + n, base.1 / 2 + n, 100 + n])
        })
    }

    /// `jpeg` with an APP1 EXIF segment that holds only the orientation tag, right after SOI.
    fn with_exif_orientation(jpeg: &[u8], orientation: u16) -> Vec<u8> {
        let mut body = b"Exif\0\0MM\0\x2a\0\0\0\x08\0\x01".to_vec();
        body.extend_from_slice(&[0x01, 0x12, 0x00, 0x03, 0, 0, 0, 1]);
        body.extend_from_slice(&orientation.to_be_bytes());
        body.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
        let mut out = vec![0xFF, 0xD8];
        out.extend_from_slice(&segment(0xE1, &body));
        out.extend_from_slice(jpeg.get(2..).expect("a JPEG starts with SOI"));
        out
    }

    #[test]
    fn decode_reads_the_exif_orientation_and_treats_an_invalid_value_as_upright() {
        let jpeg = encode(&noisy(64, 48, 7), 90).expect("encodes");
        let check = |orientation: u16, expected: Orientation| {
            let decoded = decode(&with_exif_orientation(&jpeg, orientation)).expect("decodes");
            assert_eq!(decoded.orientation, expected, "EXIF orientation {orientation}");
            assert_eq!(decoded.image.dimensions(), (64, 48));
        };
        check(1, Orientation::NoTransforms);
        check(6, Orientation::Rotate90);
        check(8, Orientation::Rotate270);
        check(0, Orientation::NoTransforms);
        check(9, Orientation::NoTransforms);
        assert_eq!(decode(&jpeg).expect("decodes").orientation, Orientation::NoTransforms);
    }

    #[test]
    fn decode_refuses_garbage_with_an_error_that_names_the_frame_size() {
        let e = decode(&[0xFF, 0xD8, 0x00, 0x01, 0x02]).expect_err("garbage");
        assert!(matches!(e, FrameError::Undecodable { bytes: 5, .. }), "{e:?}");
    }

    /// Where stored pixel (x, y) of a `w`x`h` image lands once upright, per the EXIF definition.
    type Mapping = fn(u32, u32, u32, u32) -> (u32, u32);

    fn check_orient(orientation: Orientation, swaps_sides: bool, mapping: Mapping) {
        let (w, h) = (5, 3);
        let stored = RgbImage::from_fn(w, h, |x, y| Rgb([x as u8, y as u8, 0]));
        let upright = orient(stored, orientation);
        let expected_size = if swaps_sides { (h, w) } else { (w, h) };
        assert_eq!(upright.dimensions(), expected_size, "{orientation:?}");
        for y in 0..h {
            for x in 0..w {
                let (ux, uy) = mapping(x, y, w, h);
                assert_eq!(upright.get_pixel(ux, uy).0, [x as u8, y as u8, 0], "{orientation:?} ({x}, {y})");
            }
        }
    }

    #[test]
    fn orient_applies_all_eight_exif_orientations() {
        check_orient(Orientation::NoTransforms, false, |x, y, _, _| (x, y)); // 1
        check_orient(Orientation::FlipHorizontal, false, |x, y, w, _| (w - 1 - x, y)); // 2
        check_orient(Orientation::Rotate180, false, |x, y, w, h| (w - 1 - x, h - 1 - y)); // 3
        check_orient(Orientation::FlipVertical, false, |x, y, _, h| (x, h - 1 - y)); // 4
        check_orient(Orientation::Rotate90FlipH, true, |x, y, _, _| (y, x)); // 5: transpose
        check_orient(Orientation::Rotate90, true, |x, y, _, h| (h - 1 - y, x)); // 6: 90° clockwise
        check_orient(Orientation::Rotate270FlipH, true, |x, y, w, h| (h - 1 - y, w - 1 - x)); // 7
        check_orient(Orientation::Rotate270, true, |x, y, w, _| (y, w - 1 - x));
        // 8: 90° anticlockwise
    }

    // ----- blank frames -----

    fn random_grey(width: u32, height: u32, low: u8, high: u8) -> RgbImage {
        let mut state = 0x9E37_79B9u32;
        let span = u32::from(high - low) + 1;
        RgbImage::from_fn(width, height, |_, _| {
            state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            let v = low + ((state >> 24) % span) as u8;
            Rgb([v, v, v])
        })
    }

    #[test]
    fn blank_and_single_colour_frames_are_refused() {
        let grey = RgbImage::from_pixel(640, 480, Rgb([128, 128, 128]));
        let e = check_not_blank(&grey).expect_err("flat grey");
        assert_eq!(e, FrameError::Blank { mean_luma: 128, stddev_tenths: 0 });
        assert!(e.to_string().contains("blank"), "{e}");
        assert!(e.is_retryable());
        let red = RgbImage::from_pixel(640, 480, Rgb([200, 10, 10]));
        assert!(matches!(check_not_blank(&red), Err(FrameError::Blank { .. })));
        // A lens cap: black with faint sensor noise (standard deviation about 0.8 levels).
        let capped = random_grey(640, 480, 2, 4);
        assert!(matches!(check_not_blank(&capped), Err(FrameError::Blank { mean_luma: 3, .. })));
    }

    #[test]
    fn noisy_and_dark_low_contrast_frames_are_accepted() {
        assert_eq!(check_not_blank(&noisy(640, 480, 3)), Ok(()));
        // Dark and flat, but real: luminance 10..=20 (standard deviation about 3.2 levels).
        assert_eq!(check_not_blank(&random_grey(640, 480, 10, 20)), Ok(()));
        assert_eq!(check_not_blank(&noisy(16, 16, 5)), Ok(()));
    }

    #[test]
    fn a_frame_whose_edge_band_is_the_decoders_grey_fill_is_refused_as_partly_lost() {
        let fill = Rgb(DECODER_FILL);
        let mut bottom = noisy(640, 480, 9);
        for y in 360..480 {
            for x in 0..640 {
                bottom.put_pixel(x, y, fill);
            }
        }
        assert!(matches!(check_not_blank(&bottom), Err(FrameError::PartlyLost { lost_percent: 25 })));
        // After orientation the lost band can be on any side.
        let left = orient(bottom, Orientation::Rotate90);
        assert!(matches!(check_not_blank(&left), Err(FrameError::PartlyLost { lost_percent: 25 })));
        // A thin band (1/16 of the height) is not enough to refuse a frame.
        let mut thin = noisy(640, 480, 9);
        for y in 450..480 {
            for x in 0..640 {
                thin.put_pixel(x, y, fill);
            }
        }
        assert_eq!(check_not_blank(&thin), Ok(()));
    }

    // ----- resize, encode -----

    #[test]
    fn resize_gives_exactly_the_size_asked_for() {
        let small = resize(&noisy(400, 300, 1), 200, 150).expect("resizes");
        assert_eq!(small.dimensions(), (200, 150));
        assert!(matches!(resize(&noisy(400, 300, 1), 0, 150), Err(FrameError::ResizeFailed { .. })));
    }

    /// The markers of a JPEG's segments before its first scan.
    fn markers_before_scan(jpeg: &[u8]) -> Vec<u8> {
        let mut markers = Vec::new();
        let mut pos = 2;
        while let (Some(&0xFF), Some(&marker)) = (jpeg.get(pos), jpeg.get(pos + 1)) {
            markers.push(marker);
            if marker == 0xDA {
                break;
            }
            let length = u16::from_be_bytes([jpeg[pos + 2], jpeg[pos + 3]]);
            pos += 2 + usize::from(length);
        }
        markers
    }

    #[test]
    fn encode_writes_no_exif_or_any_other_metadata_segment() {
        let jpeg = encode(&noisy(320, 240, 4), 85).expect("encodes");
        let markers = markers_before_scan(&jpeg);
        assert_eq!(markers.last(), Some(&0xDA), "{markers:02X?}");
        // JFIF (APP0), quantisation, frame, Huffman tables: nothing else.
        let allowed = [0xE0, 0xDB, 0xC0, 0xC4, 0xDA];
        assert!(markers.iter().all(|m| allowed.contains(m)), "unexpected segment in {markers:02X?}");
        assert!(!jpeg.windows(4).any(|w| w == b"Exif"));
        assert_eq!(check_complete(&jpeg), Ok(FrameHeader { width: 320, height: 240 }));
    }

    #[test]
    fn encode_writes_the_standard_huffman_tables_so_it_never_holds_a_whole_image_of_coefficients() {
        let jpeg = encode(&noisy(320, 240, 5), 85).expect("encodes");
        // The code-length counts of the luminance DC table (class 0, id 0) of ITU T.81 Annex K.3;
        // tables made for the image would differ for a noisy picture.
        let standard_dc_luma = [0u8, 1, 5, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0];
        let mut pos = 2;
        let mut found = None;
        while let (Some(&0xFF), Some(&marker)) = (jpeg.get(pos), jpeg.get(pos + 1)) {
            let length = usize::from(u16::from_be_bytes([jpeg[pos + 2], jpeg[pos + 3]]));
            if marker == 0xC4 && jpeg[pos + 4] == 0x00 {
                found = Some(jpeg[pos + 5..pos + 21].to_vec());
            }
            if marker == 0xDA {
                break;
            }
            pos += 2 + length;
        }
        assert_eq!(found.as_deref(), Some(&standard_dc_luma[..]));
    }

    #[test]
    fn quality_outside_1_to_100_is_refused() {
        let img = noisy(64, 64, 2);
        assert_eq!(encode(&img, 0), Err(FrameError::InvalidQuality { quality: 0 }));
        assert_eq!(encode(&img, 101), Err(FrameError::InvalidQuality { quality: 101 }));
        assert!(encode(&img, 1).is_ok());
        assert!(encode(&img, 100).is_ok());
        let raw = encode(&img, 90).expect("encodes");
        let spec = ResizeSpec { max_long_edge: 1920, jpeg_quality: 0 };
        assert_eq!(process(&raw, &spec), Err(FrameError::InvalidQuality { quality: 0 }));
    }

    #[test]
    fn encode_refuses_an_empty_image_cleanly() {
        let e = encode(&RgbImage::new(0, 0), 85).expect_err("empty");
        assert!(matches!(e, FrameError::EncodeFailed { width: 0, height: 0, .. }), "{e:?}");
    }

    // ----- process -----

    #[test]
    fn process_makes_a_rotated_frame_upright_shrinks_it_and_drops_its_exif() {
        let raw = with_exif_orientation(&encode(&noisy(400, 300, 8), 92).expect("encodes"), 6);
        let p = process(&raw, &ResizeSpec { max_long_edge: 200, jpeg_quality: 85 }).expect("processes");
        assert_eq!((p.source_width, p.source_height, p.width, p.height), (300, 400, 150, 200));
        assert_eq!(check_complete(&p.jpeg), Ok(FrameHeader { width: 150, height: 200 }));
        assert!(!p.jpeg.windows(4).any(|w| w == b"Exif"));
    }

    #[test]
    fn process_keeps_a_small_frame_at_its_size() {
        let raw = encode(&noisy(120, 90, 6), 92).expect("encodes");
        let p = process(&raw, &ResizeSpec { max_long_edge: 1920, jpeg_quality: 85 }).expect("processes");
        assert_eq!((p.source_width, p.source_height, p.width, p.height), (120, 90, 120, 90));
    }

    #[test]
    fn process_refuses_a_blank_frame_as_retryable() {
        let raw = encode(&RgbImage::from_pixel(640, 480, Rgb([128, 128, 128])), 90).expect("encodes");
        let e = process(&raw, &ResizeSpec { max_long_edge: 1920, jpeg_quality: 85 }).expect_err("blank");
        assert!(matches!(e, FrameError::Blank { .. }) && e.is_retryable(), "{e:?}");
    }

    // ----- errors -----

    #[test]
    fn only_frame_faults_a_recapture_can_fix_are_retryable() {
        let check = |e: FrameError, retryable: bool| assert_eq!(e.is_retryable(), retryable, "{e:?}");
        check(FrameError::Empty, true);
        check(FrameError::NotJpeg { bytes: 3, start: "00 01 02".into() }, true);
        check(FrameError::Truncated { bytes: 10, end: "00".into() }, true);
        check(FrameError::Malformed { offset: 2, bytes: 10, problem: "x".into() }, true);
        check(FrameError::Undecodable { bytes: 10, reason: "x".into() }, true);
        check(FrameError::Blank { mean_luma: 0, stddev_tenths: 0 }, true);
        check(FrameError::PartlyLost { lost_percent: 50 }, true);
        check(FrameError::ZeroDimension { width: 0, height: 1 }, false);
        check(FrameError::TooSmall { width: 8, height: 8 }, false);
        check(FrameError::TooLarge { width: 20_000, height: 14_000, megapixels: 280 }, false);
        check(FrameError::Unsupported { encoding: "x".into() }, false);
        check(FrameError::InvalidQuality { quality: 0 }, false);
    }

    #[test]
    fn error_messages_give_the_numbers_and_end_without_a_period() {
        let check = |e: FrameError, words: &[&str]| {
            let text = e.to_string();
            assert!(!text.ends_with('.'), "{text}");
            for w in words {
                assert!(text.contains(w), "{text:?} lacks {w:?}");
            }
        };
        check(
            FrameError::Truncated { bytes: 48_197, end: "11 00 3F 00".into() },
            &["48197 bytes", "FF D9", "re-capture"],
        );
        check(
            FrameError::TooLarge { width: 20_000, height: 14_000, megapixels: 280 },
            &["20000x14000", "280 megapixels", "16384", "100 megapixels"],
        );
        check(FrameError::Blank { mean_luma: 128, stddev_tenths: 4 }, &["0.4 levels", "128", "2.0"]);
        check(FrameError::TooSmall { width: 8, height: 8 }, &["8x8", "16 pixels"]);
        check(FrameError::InvalidQuality { quality: 101 }, &["101", "1 to 100"]);
        check(FrameError::PartlyLost { lost_percent: 75 }, &["75%", "128,128,128"]);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        #[test]
        fn process_never_panics_on_arbitrary_bytes(raw in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = process(&raw, &ResizeSpec { max_long_edge: 64, jpeg_quality: 80 });
        }

        #[test]
        fn check_complete_never_panics_on_arbitrary_segments_between_soi_and_eoi(
            middle in proptest::collection::vec(
                prop_oneof![Just(0xFFu8), Just(0xC0), Just(0xDA), Just(0x00), any::<u8>()], 0..256),
        ) {
            let mut raw = vec![0xFF, 0xD8];
            raw.extend_from_slice(&middle);
            raw.extend_from_slice(&[0xFF, 0xD9]);
            let _ = check_complete(&raw);
            let _ = process(&raw, &ResizeSpec { max_long_edge: 64, jpeg_quality: 80 });
        }
    }
}
