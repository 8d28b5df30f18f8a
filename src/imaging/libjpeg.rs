//! JPEG decoding and encoding through libjpeg-turbo (the build that ships with the `mozjpeg`
//! crate, with its SIMD code when `nasm` is present on x86-64, and always on ARM).
//!
//! Two things make it the kiosk's codec: it decodes straight to a smaller size by dropping DCT
//! coefficients (a 12 MP frame bound for 1920 pixels is decoded at half size, which costs half
//! the work and gives the resizer a quarter of the pixels), and its SIMD encoder is several
//! times faster than a portable one.
//!
//! libjpeg reports errors by calling a function that must not return. Here that function
//! unwinds (`resume_unwind`, which skips the panic hook, so nothing is printed) and every call
//! into the library runs under `catch_unwind`, which turns the unwind back into an error. Its
//! warnings are how libjpeg says that the compressed data was garbled and it painted over the
//! damage; those are treated as errors too, except the few that leave the picture whole.

use std::os::raw::c_int;
use std::panic::{self, AssertUnwindSafe};

use image::metadata::Orientation;
use image::RgbImage;
use mozjpeg::{ColorSpace, Compress, Decompress, Marker};
use mozjpeg_sys::{jpeg_common_struct, jpeg_error_mgr, jpeg_std_error};

/// libjpeg's recommended size for a formatted message (`JMSG_LENGTH_MAX`), with room to spare.
const MESSAGE_BUFFER: usize = 256;

/// Warnings after which the picture is still whole: junk bytes between segments or before a
/// marker (skipped), an unknown Adobe transform or JFIF version, a malformed ICC profile (not
/// used). Every other warning means that part of the picture was painted over.
const HARMLESS_WARNINGS: [c_int; 4] = [
    mozjpeg_sys::JWRN_EXTRANEOUS_DATA as c_int,
    mozjpeg_sys::JWRN_ADOBE_XFORM as c_int,
    mozjpeg_sys::JWRN_JFIF_MAJOR as c_int,
    mozjpeg_sys::JWRN_BOGUS_ICC as c_int,
];

/// The pixels of a frame decoded at `eighths`/8 of its stored size, its stored size, and its
/// EXIF orientation.
pub(super) struct Pixels {
    pub image: RgbImage,
    pub stored_width: u32,
    pub stored_height: u32,
    pub orientation: Orientation,
}

/// Why a call into libjpeg failed. `imaging` turns it into a [`super::FrameError`]
/// (`Undecodable` or `EncodeFailed`) with this as the reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(super) enum CodecError {
    /// libjpeg stopped with an error, or warned that it painted over garbled data, in its own
    /// words. Decoding the same bytes again fails the same way; a new frame from the camera
    /// usually decodes.
    #[error("{0}")]
    Library(String),
    /// The mozjpeg wrapper refused a call (its own checks around libjpeg's), in its words.
    /// Not retryable with the same input.
    #[error("{0}")]
    Wrapper(String),
    /// The decoder returned fewer samples than the picture's size needs. Not retryable with
    /// the same input.
    #[error("the decoder returned too few pixels for {width}x{height}")]
    ShortOutput { width: usize, height: usize },
}

impl From<std::io::Error> for CodecError {
    fn from(e: std::io::Error) -> CodecError {
        CodecError::Wrapper(e.to_string())
    }
}

/// What went wrong in a decode.
pub(super) enum DecodeFailure {
    /// The header's size fails `check`; nothing was decoded.
    Refused(super::FrameError),
    /// libjpeg failed, or warned that it painted over garbled data.
    Failed(CodecError),
}

/// Decodes `raw` to RGB at `eighths`/8 of its stored size (1..=8; libjpeg rounds each side up),
/// calling `check` with the stored width and height before any pixel is decoded. Grayscale
/// becomes grey RGB; CMYK and YCCK (as Adobe writes them, inverted) become RGB.
pub(super) fn decode(
    raw: &[u8],
    eighths: u8,
    check: impl FnOnce(u32, u32) -> Result<(), super::FrameError>,
) -> Result<Pixels, DecodeFailure> {
    let run = || -> Result<Pixels, DecodeFailure> {
        let failed = |e: std::io::Error| DecodeFailure::Failed(e.into());
        let mut header = Decompress::with_err(error_manager())
            .with_markers(&[Marker::APP(1)])
            .from_mem(raw)
            .map_err(failed)?;
        let stored_width = u32::try_from(header.width()).unwrap_or(u32::MAX);
        let stored_height = u32::try_from(header.height()).unwrap_or(u32::MAX);
        check(stored_width, stored_height).map_err(DecodeFailure::Refused)?;
        let orientation = header
            .markers()
            .filter(|m| m.marker == Marker::APP(1))
            .find_map(|m| m.data.strip_prefix(b"Exif\0\0"))
            .and_then(Orientation::from_exif_chunk)
            .unwrap_or(Orientation::NoTransforms);
        header.scale(eighths.clamp(1, 8));
        let cmyk = matches!(header.color_space(), ColorSpace::JCS_CMYK | ColorSpace::JCS_YCCK);
        let mut started =
            if cmyk { header.to_colorspace(ColorSpace::JCS_CMYK) } else { header.rgb() }.map_err(failed)?;
        let (width, height) = (started.width(), started.height());
        let samples: Vec<u8> = started.read_scanlines().map_err(failed)?;
        started.finish().map_err(failed)?;
        let rgb = if cmyk { inverted_cmyk_to_rgb(&samples) } else { samples };
        let image = u32::try_from(width)
            .ok()
            .zip(u32::try_from(height).ok())
            .and_then(|(w, h)| RgbImage::from_raw(w, h, rgb))
            .ok_or(DecodeFailure::Failed(CodecError::ShortOutput { width, height }))?;
        Ok(Pixels { image, stored_width, stored_height, orientation })
    };
    guarded(run).unwrap_or_else(|e| Err(DecodeFailure::Failed(e)))
}

/// Encodes RGB pixels as a baseline JPEG with the standard Huffman tables, 4:2:0 chroma and a
/// JFIF header only.
///
/// Tables made for the image would need every quantised coefficient of the image before the
/// first byte is written: this build keeps two whole-image coefficient buffers for that (about
/// 15 MB for a 1920x1280 image, twice the pixels) and makes a second pass over them. With the
/// standard tables the encoder holds one row of blocks; on the kiosk's photos the output is
/// about 2 % larger and the encoding two to three times faster.
pub(super) fn encode(image: &RgbImage, quality: u8) -> Result<Vec<u8>, CodecError> {
    let run = || -> Result<Vec<u8>, CodecError> {
        let mut compress = Compress::new_err(Box::new(error_manager()), ColorSpace::JCS_RGB);
        compress.set_fastest_defaults();
        compress.set_size(image.width() as usize, image.height() as usize);
        compress.set_quality(f32::from(quality));
        compress.set_optimize_coding(false);
        let mut started = compress.start_compress(Vec::new())?;
        started.write_scanlines(image.as_raw())?;
        Ok(started.finish()?)
    };
    guarded(run).and_then(|result| result)
}

/// Encodes an image of `width`x`height` whose rows `fill` writes a band of up to `band_rows`
/// rows at a time (called with the first row of the band and a buffer of whole RGB rows), with
/// the standard Huffman tables: tables made for the image would need all of its coefficients
/// before the first byte is written, and this way only a band is ever in memory.
pub(super) fn encode_bands(
    width: u32,
    height: u32,
    quality: u8,
    band_rows: u32,
    fill: &mut dyn FnMut(u32, &mut [u8]),
) -> Result<Vec<u8>, CodecError> {
    let run = || -> Result<Vec<u8>, CodecError> {
        let mut compress = Compress::new_err(Box::new(error_manager()), ColorSpace::JCS_RGB);
        compress.set_fastest_defaults();
        compress.set_size(width as usize, height as usize);
        compress.set_quality(f32::from(quality));
        compress.set_optimize_coding(false);
        let mut started = compress.start_compress(Vec::new())?;
        let row_bytes = width as usize * 3;
        let band_rows = band_rows.max(1);
        let mut band = vec![0u8; row_bytes * band_rows as usize];
        let mut first = 0u32;
        while first < height {
            let rows = band_rows.min(height - first);
            let band = &mut band[..row_bytes * rows as usize];
            fill(first, band);
            started.write_scanlines(band)?;
            first += rows;
        }
        Ok(started.finish()?)
    };
    guarded(run).and_then(|result| result)
}

/// Runs `f`, which calls into libjpeg, turning an unwind out of it into its message.
fn guarded<T>(f: impl FnOnce() -> T) -> Result<T, CodecError> {
    panic::catch_unwind(AssertUnwindSafe(f)).map_err(|payload| CodecError::Library(unwind_text(payload)))
}

/// Adobe CMYK as stored in JPEG files is inverted (0 is full ink), so each channel times K is
/// the RGB value.
fn inverted_cmyk_to_rgb(cmyk: &[u8]) -> Vec<u8> {
    let mut rgb = Vec::with_capacity(cmyk.len() / 4 * 3);
    for px in cmyk.chunks_exact(4) {
        let k = u16::from(px[3]);
        for &ink in &px[..3] {
            rgb.push(((u16::from(ink) * k + 127) / 255) as u8);
        }
    }
    rgb
}

/// The text an unwind out of libjpeg (or, should it happen, a panic in the wrapper) carries.
fn unwind_text(payload: Box<dyn std::any::Any + Send>) -> String {
    match payload.downcast::<String>() {
        Ok(text) => *text,
        Err(payload) => match payload.downcast::<&'static str>() {
            Ok(text) => (*text).to_owned(),
            Err(_) => "the JPEG library failed without a message".to_owned(),
        },
    }
}

/// libjpeg's standard error manager with its exits replaced: errors and damaging warnings
/// unwind with libjpeg's own message, harmless warnings and trace messages are ignored (the
/// library would otherwise print them to stderr, or exit the process on an error).
fn error_manager() -> jpeg_error_mgr {
    // SAFETY: every field of jpeg_error_mgr is an integer, a raw pointer or an optional function
    // pointer, for which all zero bits are valid; jpeg_std_error then fills it in.
    let mut manager: jpeg_error_mgr = unsafe { std::mem::zeroed() };
    // SAFETY: `manager` is a valid, exclusively borrowed error manager.
    unsafe { jpeg_std_error(&mut manager) };
    manager.error_exit = Some(on_error);
    manager.emit_message = Some(on_message);
    manager
}

/// libjpeg's `error_exit`: must not return, so it unwinds with the message.
unsafe extern "C-unwind" fn on_error(cinfo: &mut jpeg_common_struct) {
    // SAFETY: libjpeg passes the object whose error manager this is.
    let text = unsafe { message_text(cinfo) };
    panic::resume_unwind(Box::new(text));
}

/// libjpeg's `emit_message`: level -1 is a warning, 0 and above are trace messages.
unsafe extern "C-unwind" fn on_message(cinfo: &mut jpeg_common_struct, level: c_int) {
    if level >= 0 {
        return;
    }
    // SAFETY: libjpeg passes the object whose error manager this is; `err` points to it.
    let code = unsafe { (*cinfo.err).msg_code };
    if HARMLESS_WARNINGS.contains(&code) {
        return;
    }
    // SAFETY: as above; a damaging warning ends the call as an error does.
    unsafe { on_error(cinfo) }
}

/// The current message of `cinfo`'s error manager, formatted by libjpeg.
///
/// # Safety
/// `cinfo.err` must point to the error manager libjpeg is reporting through.
unsafe fn message_text(cinfo: &mut jpeg_common_struct) -> String {
    // SAFETY: the caller guarantees `err` is valid.
    let err = unsafe { &*cinfo.err };
    let (Some(format), code) = (err.format_message, err.msg_code) else {
        return format!("JPEG library message {}", err.msg_code);
    };
    // The binding declares the buffer as a shared 80-byte array; libjpeg writes up to
    // JMSG_LENGTH_MAX (200) bytes into it. Call it with a pointer to a large enough, writable one.
    type FormatMessage = unsafe extern "C-unwind" fn(&mut jpeg_common_struct, *mut u8);
    // SAFETY: same ABI; a reference and a raw pointer to the buffer are passed identically.
    let format: FormatMessage = unsafe { std::mem::transmute(format) };
    let mut buffer = [0u8; MESSAGE_BUFFER];
    // SAFETY: the buffer is writable and larger than libjpeg's longest message.
    unsafe { format(cinfo, buffer.as_mut_ptr()) };
    let end = buffer.iter().position(|&b| b == 0).unwrap_or(0);
    let text = String::from_utf8_lossy(&buffer[..end]).trim().to_owned();
    if text.is_empty() {
        format!("JPEG library message {code}")
    } else {
        text
    }
}
