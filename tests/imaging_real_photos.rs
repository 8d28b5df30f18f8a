//! The imaging path on real files from `../shared/testdata` (described, with sources and
//! licences, in its SOURCES.md): camera and vehicle photos, the EXIF orientation set, unusual
//! encodings and corrupt files. Each big camera photo is processed once.

use std::collections::BTreeSet;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use capture_kiosk::imaging::{self, FrameError, FrameHeader, Orientation, ResizeSpec};
use image::RgbImage;
use proptest::prelude::*;

/// Large enough that no test photo is resized.
const NO_RESIZE: ResizeSpec = ResizeSpec { max_long_edge: 8192, jpeg_quality: 90 };
/// What the kiosk ships with.
const KIOSK: ResizeSpec = ResizeSpec { max_long_edge: 1920, jpeg_quality: 85 };

/// An orientation photo is upright if its RMSE from the upright `_1` photo of its series is
/// below this (percent of full scale, over the means of 60x60-pixel cells). The photos differ by
/// their drawn digit and by JPEG loss: 0.3–0.8% measured; a wrong-way photo is 18–38% off.
const UPRIGHT_MAX_RMSE_PERCENT: f64 = 3.0;
/// The same reference flipped or turned 180° must be at least this far from it, so that the
/// threshold above can tell an upright photo from a wrong one.
const WRONG_WAY_MIN_RMSE_PERCENT: f64 = 3.0 * UPRIGHT_MAX_RMSE_PERCENT;

fn testdata() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/testdata");
    assert!(
        dir.join("SOURCES.md").is_file(),
        "the test photos are missing: expected {} with SOURCES.md, camera/, vehicles/, orientation/, \
         formats/ and corrupt/ (the shared testdata directory next to this repository)",
        dir.display()
    );
    dir
}

fn read(relative: &str) -> Vec<u8> {
    let path = testdata().join(relative);
    std::fs::read(&path).unwrap_or_else(|e| panic!("cannot read test photo {}: {e}", path.display()))
}

/// The names of the files in a testdata folder, sorted.
fn names_in(folder: &str) -> BTreeSet<String> {
    let dir = testdata().join(folder);
    let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()));
    entries.map(|e| e.expect("directory entry").file_name().to_string_lossy().into_owned()).collect()
}

fn process_file(relative: &str, spec: &ResizeSpec) -> Result<imaging::Processed, FrameError> {
    let raw = read(relative);
    catch_unwind(AssertUnwindSafe(|| imaging::process(&raw, spec)))
        .unwrap_or_else(|_| panic!("process panicked on {relative}"))
}

fn pixels(jpeg: &[u8]) -> RgbImage {
    image::load_from_memory_with_format(jpeg, image::ImageFormat::Jpeg).expect("output decodes").into_rgb8()
}

/// The markers of the segments before the first scan.
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

/// No EXIF (so no GPS or maker notes), XMP, ICC, IPTC or comment: only JFIF and the tables the
/// pixels need.
fn assert_no_metadata(jpeg: &[u8], name: &str) {
    let markers = markers_before_scan(jpeg);
    assert_eq!(markers.last(), Some(&0xDA), "{name}: no scan found in {markers:02X?}");
    let allowed = [0xE0, 0xDB, 0xC0, 0xC4, 0xDA];
    assert!(markers.iter().all(|m| allowed.contains(m)), "{name}: metadata segment in {markers:02X?}");
    for needle in [&b"Exif"[..], b"GPS", b"http://ns.adobe.com"] {
        assert!(!jpeg.windows(needle.len()).any(|w| w == needle), "{name}: output contains {needle:?}");
    }
}

/// Mean RGB of each cell of a `columns`x`rows` grid.
fn cell_means(img: &RgbImage, columns: u32, rows: u32) -> Vec<[f64; 3]> {
    let (w, h) = img.dimensions();
    let mut sums = vec![([0u64; 3], 0u64); (columns * rows) as usize];
    for (x, y, p) in img.enumerate_pixels() {
        let cell = &mut sums[((y * rows / h) * columns + x * columns / w) as usize];
        for c in 0..3 {
            cell.0[c] += u64::from(p.0[c]);
        }
        cell.1 += 1;
    }
    sums.into_iter().map(|(s, n)| s.map(|v| v as f64 / n as f64)).collect()
}

fn rmse_percent(a: &[[f64; 3]], b: &[[f64; 3]]) -> f64 {
    assert_eq!(a.len(), b.len());
    let sum: f64 = a.iter().zip(b).flat_map(|(p, q)| (0..3).map(move |c| (p[c] - q[c]).powi(2))).sum();
    (sum / (a.len() * 3) as f64).sqrt() / 255.0 * 100.0
}

/// A grid of cells mirrored left to right.
fn flip_horizontal(cells: &[[f64; 3]], columns: usize) -> Vec<[f64; 3]> {
    cells.chunks(columns).flat_map(|row| row.iter().rev().copied()).collect()
}

/// A grid of cells turned 180°.
fn rotate_180(cells: &[[f64; 3]]) -> Vec<[f64; 3]> {
    cells.iter().rev().copied().collect()
}

#[test]
fn all_eighteen_orientation_photos_come_out_upright() {
    let mut failures = Vec::new();
    let mut seen = 0;
    for (series, upright_size) in [("Landscape", (1800, 1200)), ("Portrait", (1200, 1800))] {
        let (columns, rows) = (upright_size.0 / 60, upright_size.1 / 60);
        let reference = process_file(&format!("orientation/{series}_1.jpg"), &NO_RESIZE).expect("reference");
        let reference = cell_means(&pixels(&reference.jpeg), columns, rows);
        // Negative control: the measure tells a wrong-way photo from an upright one.
        for (how, wrong) in [
            ("flipped", flip_horizontal(&reference, columns as usize)),
            ("turned 180°", rotate_180(&reference)),
        ] {
            let rmse = rmse_percent(&wrong, &reference);
            assert!(
                rmse > WRONG_WAY_MIN_RMSE_PERCENT,
                "{series}_1 {how} is only {rmse:.1}% from itself: the RMSE cannot tell orientations apart"
            );
        }
        for n in 0..=8 {
            let name = format!("orientation/{series}_{n}.jpg");
            let p = process_file(&name, &NO_RESIZE).unwrap_or_else(|e| panic!("{name}: {e}"));
            seen += 1;
            let size = (p.source_width, p.source_height);
            assert_eq!(size, upright_size, "{name}: upright source size");
            assert_eq!((p.width, p.height), upright_size, "{name}: resized although it fits");
            let out = pixels(&p.jpeg);
            assert_eq!(out.dimensions(), upright_size, "{name}: output size");
            let rmse = rmse_percent(&cell_means(&out, columns, rows), &reference);
            if rmse > UPRIGHT_MAX_RMSE_PERCENT {
                failures.push(format!("{name}: {rmse:.2}% from {series}_1"));
            }
        }
    }
    assert_eq!(seen, 18);
    assert!(failures.is_empty(), "not upright (RMSE above {UPRIGHT_MAX_RMSE_PERCENT}%): {failures:#?}");
}

/// A camera photo: file, size as stored, whether EXIF turns it to portrait.
type CameraPhoto = (&'static str, (u32, u32), bool);

fn check_camera_photos(folder: &str, photos: &[CameraPhoto]) {
    let listed: BTreeSet<String> = photos.iter().map(|(name, _, _)| (*name).to_owned()).collect();
    assert_eq!(names_in(folder), listed, "{folder}/ holds other files than this test knows");
    for &(name, stored, turned) in photos {
        let path = format!("{folder}/{name}");
        let raw = read(&path);
        let header = imaging::check_complete(&raw).unwrap_or_else(|e| panic!("{path}: {e}"));
        assert_eq!((header.width, header.height), stored, "{path}: header size");
        let p = imaging::process(&raw, &KIOSK).unwrap_or_else(|e| panic!("{path}: {e}"));
        let upright = if turned { (stored.1, stored.0) } else { stored };
        assert_eq!((p.source_width, p.source_height), upright, "{path}: upright source size");
        assert_eq!(p.width.max(p.height), 1920, "{path}: long edge of {}x{}", p.width, p.height);
        assert_eq!(p.height > p.width, upright.1 > upright.0, "{path}: portrait/landscape");
        // Aspect ratio within a pixel: |w * src_h - h * src_w| <= long side of the source.
        let cross =
            (u64::from(p.width) * u64::from(upright.1)).abs_diff(u64::from(p.height) * u64::from(upright.0));
        assert!(
            cross <= u64::from(upright.0.max(upright.1)),
            "{path}: {}x{} from {upright:?}",
            p.width,
            p.height
        );
        assert_no_metadata(&p.jpeg, &path);
        let decoded =
            imaging::decode(&p.jpeg).unwrap_or_else(|e| panic!("{path}: output does not decode: {e}"));
        assert_eq!(decoded.image.dimensions(), (p.width, p.height), "{path}: output size");
        assert_eq!(decoded.orientation, Orientation::NoTransforms, "{path}: output orientation");
    }
}

#[test]
fn camera_photos_come_out_upright_at_1920_with_their_aspect_and_no_metadata() {
    check_camera_photos(
        "camera",
        &[
            ("apple_iphone4s_8mp_orient6.jpg", (3264, 2448), true),
            ("canon_eos5d_mark3_22mp_photoshop.jpg", (5760, 3840), false),
            ("fujifilm_finepix_f40fd_8mp.jpg", (3296, 2472), false),
            ("leica_t_typ701_16mp_orient8.jpg", (4928, 3264), true),
            ("nikon_d3100_14mp.jpg", (4608, 3072), false),
            ("samsung_galaxy_s4_gt-i9505_10mp.jpg", (4128, 2322), false),
            ("sony_dsc-h9_8mp.jpg", (3264, 2448), false),
        ],
    );
}

#[test]
fn vehicle_photos_come_out_at_1920_with_their_aspect_and_no_metadata() {
    check_camera_photos(
        "vehicles",
        &[
            ("canon_eos1d_mark3_race_car_lightroom.jpg", (2659, 1773), false),
            ("canon_eos450d_red_car_12mp.jpg", (4272, 2848), false),
            ("canon_powershot_s40_car_rear_plate.jpg", (2272, 1704), false),
            ("minolta_dimage7hi_vintage_car_5mp.jpg", (2560, 1920), false),
        ],
    );
}

#[test]
fn a_small_photo_is_never_upscaled() {
    let p = process_file("formats/grayscale_hopper_128x128.jpg", &KIOSK).expect("processes");
    assert_eq!((p.source_width, p.source_height, p.width, p.height), (128, 128, 128, 128));
    assert_eq!(pixels(&p.jpeg).dimensions(), (128, 128));
}

/// What `process` does with a file in formats/.
enum Outcome {
    /// Processed, at this size.
    Processed(u32, u32),
    /// Refused as unsupported, with these words in the message, by `check_complete` already.
    Unsupported(&'static str),
    /// Refused as too large by `check_complete`, before any pixel is decoded.
    TooLarge(u32, u32),
}

#[test]
fn unusual_encodings_decode_or_are_refused_as_unsupported() {
    use Outcome::*;
    let formats: &[(&str, Outcome)] = &[
        ("12bit_monkey12.jpg", Unsupported("12-bit samples")),
        ("arithmetic_coded_testimgari.jpg", Unsupported("arithmetic coding")),
        ("baseline_ijg_testorig.jpg", Processed(227, 149)),
        ("cmyk_ycck_multi_icc_photoshop.jpg", Processed(140, 140)),
        ("grayscale_hopper_128x128.jpg", Processed(128, 128)),
        ("huge_20000x14000_gray_280mp.jpg", TooLarge(20_000, 14_000)),
        ("lossless_sof3_16bit_gray.jpg", Unsupported("lossless JPEG (SOF3)")),
        // No DHT segment: the decoder uses the standard Huffman tables, as MJPEG expects; the 6
        // stray bytes before an RST marker are skipped.
        ("mjpeg_frame_no_dht_960x720.jpg", Processed(960, 720)),
        ("mozilla_cmyk_adobe_32x32.jpg", Processed(32, 32)),
        ("mozilla_gray_32x32.jpg", Processed(32, 32)),
        ("mozilla_progressive_32x32.jpg", Processed(32, 32)),
        ("progressive_exif_panasonic_dmc-lc70.jpg", Processed(1280, 960)),
        ("restart_markers_33x33.jpg", Processed(33, 33)),
    ];
    let listed: BTreeSet<String> = formats.iter().map(|(name, _)| (*name).to_owned()).collect();
    assert_eq!(names_in("formats"), listed, "formats/ holds other files than this test knows");
    for (name, outcome) in formats {
        let path = format!("formats/{name}");
        let raw = read(&path);
        match *outcome {
            Processed(w, h) => {
                let p = imaging::process(&raw, &KIOSK).unwrap_or_else(|e| panic!("{path}: {e}"));
                assert_eq!((p.width, p.height), (w, h), "{path}");
                assert_eq!(pixels(&p.jpeg).dimensions(), (w, h), "{path}");
            }
            Unsupported(words) => {
                let e = imaging::check_complete(&raw).expect_err(&path);
                assert!(matches!(e, FrameError::Unsupported { .. }), "{path}: {e:?}");
                assert!(e.to_string().contains(words) && !e.is_retryable(), "{path}: {e}");
                assert_eq!(imaging::process(&raw, &KIOSK), Err(e), "{path}");
            }
            TooLarge(width, height) => {
                let e = imaging::check_complete(&raw).expect_err(&path);
                assert!(
                    matches!(e, FrameError::TooLarge { width: w, height: h, .. } if (w, h) == (width, height)),
                    "{path}: {e:?}"
                );
                assert_eq!(imaging::process(&raw, &KIOSK), Err(e), "{path}");
            }
        }
    }
}

#[test]
fn cmyk_and_grayscale_photos_become_plain_rgb_with_the_right_colours() {
    // The YCCK logo is on white: its corner must stay white (an uninverted CMYK would be black).
    let logo = pixels(&process_file("formats/cmyk_ycck_multi_icc_photoshop.jpg", &KIOSK).expect("logo").jpeg);
    assert!(logo.get_pixel(2, 2).0.iter().all(|&c| c > 230), "corner is {:?}", logo.get_pixel(2, 2));
    // Grey in, grey out.
    let hopper = pixels(&process_file("formats/grayscale_hopper_128x128.jpg", &KIOSK).expect("hopper").jpeg);
    let colourful =
        hopper.pixels().filter(|p| p.0[0].abs_diff(p.0[1]) > 4 || p.0[1].abs_diff(p.0[2]) > 4).count();
    assert_eq!(colourful, 0, "a grayscale photo came out coloured");
}

/// What happens to a file in corrupt/.
enum Verdict {
    /// Processed: a usable frame despite its quirk (the reason is why).
    Accepted(&'static str),
    /// Refused with this error.
    Refused(fn(&FrameError) -> bool),
}

#[test]
fn every_corrupt_file_is_refused_cleanly_unless_it_is_really_usable() {
    use FrameError as E;
    use Verdict::*;
    let files: &[(&str, Verdict)] = &[
        ("corrupt_header_1024_bytes.jpg", Refused(|e| matches!(e, E::Truncated { bytes: 1024, .. }))),
        (
            "dims_65535x65535_bomb.jpg",
            Refused(|e| matches!(e, E::TooLarge { width: 65535, height: 65535, .. })),
        ),
        ("dnl_height0_beach.jpg", Refused(|e| matches!(e, E::ZeroDimension { width: 200, height: 0 }))),
        ("empty_0_bytes.jpg", Refused(|e| *e == E::Empty)),
        (
            "extraneous_bytes_before_eoi.jpg",
            Accepted("3 junk bytes before the end marker: libjpeg only warns, the picture is whole"),
        ),
        // It ends with FF D9 and one more byte (AF), which is not padding.
        ("fuzz_dc_predictor_overflow.jpg", Refused(|e| matches!(e, E::Truncated { .. }))),
        ("fuzz_derive_huffman_codes_overflow.jpg", Refused(|e| matches!(e, E::Truncated { .. }))),
        // The SOF says height 800, width 0 (SOURCES.md's "0x800" is width x height).
        ("height_zero.jpg", Refused(|e| matches!(e, E::ZeroDimension { width: 0, height: 800 }))),
        ("its_613_bytes_claims_2820x3077.jpg", Refused(|e| matches!(e, E::Truncated { bytes: 613, .. }))),
        // libjpeg would skip the broken restart sequence with a warning and paint the rest of the
        // frame over; damaging warnings are refused in libjpeg's words.
        (
            "its_bad_restart_marker_sony_1280x960.jpg",
            Refused(|e| matches!(e, E::Undecodable { reason, .. } if reason.contains("instead of RST0"))),
        ),
        ("its_bogus_marker_length.jpg", Refused(|e| matches!(e, E::Undecodable { .. }))),
        ("its_bogus_sampling_factors.jpg", Refused(|e| matches!(e, E::Undecodable { .. }))),
        // As above: the bad Huffman code would end the decoding and leave the bottom half grey.
        (
            "its_gray_progressive_bad_huffman.jpg",
            Refused(|e| matches!(e, E::Undecodable { reason, .. } if reason.contains("bad Huffman code"))),
        ),
        ("its_invalid_progressive_params.jpg", Refused(|e| matches!(e, E::Undecodable { .. }))),
        ("its_not_jpeg_starts_ff00.jpg", Refused(|e| matches!(e, E::NotJpeg { bytes: 128, .. }))),
        ("its_truncated_garbled_3484x2347.jpg", Refused(|e| matches!(e, E::Truncated { .. }))),
        // The undefined table (0x0d) is named only by the last AC refinement scan of the Cr
        // component: libjpeg stops there.
        (
            "its_undefined_huffman_table.jpg",
            Refused(
                |e| matches!(e, E::Undecodable { reason, .. } if reason.contains("0x0d was not defined")),
            ),
        ),
        (
            "junk_before_dqt_1024x768.jpg",
            Accepted("5 junk bytes between segments: skipped as libjpeg does, the picture is whole"),
        ),
        ("missing_sof.jpg", Refused(|e| matches!(e, E::Malformed { .. }))),
        ("missing_sos.jpg", Refused(|e| matches!(e, E::Malformed { .. }))),
        ("multiple_0xff_before_eoi_valid.jpg", Accepted("fill bytes before the end marker are valid JPEG")),
        ("pixel6_ultrahdr_truncated.jpg", Refused(|e| matches!(e, E::Truncated { bytes: 48_197, .. }))),
        // 8x8: refused for its size before its broken progression matters.
        ("progressive_missing_dc.jpg", Refused(|e| matches!(e, E::TooSmall { width: 8, height: 8 }))),
        ("progressive_truncated_4x4.jpg", Refused(|e| matches!(e, E::TooSmall { width: 4, height: 4 }))),
        ("soi_eoi_only_4_bytes.jpg", Refused(|e| matches!(e, E::Malformed { .. }))),
        ("truncated_100x100_pillow.jpg", Refused(|e| matches!(e, E::Truncated { .. }))),
        // Height 0 too, but the missing end marker is found first.
        ("width3360_height0.jpg", Refused(|e| matches!(e, E::Truncated { .. }))),
    ];
    let listed: BTreeSet<String> = files.iter().map(|(name, _)| (*name).to_owned()).collect();
    assert_eq!(names_in("corrupt"), listed, "corrupt/ holds other files than this test knows");
    let mut wrong = Vec::new();
    for (name, verdict) in files {
        let path = format!("corrupt/{name}");
        match (process_file(&path, &KIOSK), verdict) {
            (Ok(p), Accepted(why)) => {
                assert_eq!(pixels(&p.jpeg).dimensions(), (p.width, p.height), "{path} ({why})");
            }
            (Err(e), Refused(expected)) if expected(&e) => {
                let text = e.to_string();
                assert!(!text.is_empty() && !text.ends_with('.'), "{path}: {text}");
            }
            (outcome, _) => wrong.push(format!("{path}: {:?}", outcome.map(|p| (p.width, p.height)))),
        }
    }
    assert!(wrong.is_empty(), "unexpected outcomes: {wrong:#?}");
}

#[test]
fn the_280_megapixel_file_is_refused_from_its_header() {
    let raw = read("formats/huge_20000x14000_gray_280mp.jpg");
    let e = imaging::check_complete(&raw).expect_err("too large");
    assert_eq!(e, FrameError::TooLarge { width: 20_000, height: 14_000, megapixels: 280 });
    assert!(!e.is_retryable());
    assert!(e.to_string().contains("refused before decoding"), "{e}");
    // So is the 186-byte bomb that claims 65535x65535.
    let bomb = read("corrupt/dims_65535x65535_bomb.jpg");
    assert!(matches!(imaging::check_complete(&bomb), Err(FrameError::TooLarge { megapixels: 4294, .. })));
}

/// A small real photo (227x149, 5770 bytes) for the corruption property.
fn small_photo() -> Vec<u8> {
    read("formats/baseline_ijg_testorig.jpg")
}

#[test]
fn the_small_photo_used_for_corruption_is_itself_fine() {
    let raw = small_photo();
    assert_eq!(imaging::check_complete(&raw), Ok(FrameHeader { width: 227, height: 149 }));
    assert!(imaging::process(&raw, &KIOSK).is_ok());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn a_real_photo_cut_short_anywhere_is_refused_without_a_panic(cut in 0usize..5768) {
        let raw = small_photo();
        let cut = raw.get(..cut).expect("cut within the photo");
        let result = catch_unwind(|| imaging::process(cut, &KIOSK));
        prop_assert!(result.is_ok(), "process panicked on the photo cut at {} bytes", cut.len());
        prop_assert!(result.expect("checked").is_err(), "a photo cut at {} bytes was accepted", cut.len());
    }

    #[test]
    fn a_real_photo_with_random_bytes_changed_never_makes_process_panic(
        changes in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..12),
        cut in proptest::option::of(any::<prop::sample::Index>()),
    ) {
        let mut raw = small_photo();
        for (at, value) in &changes {
            let i = at.index(raw.len());
            raw[i] = *value;
        }
        if let Some(cut) = cut {
            raw.truncate(cut.index(raw.len()));
        }
        let result = catch_unwind(|| imaging::process(&raw, &KIOSK));
        prop_assert!(result.is_ok(), "process panicked on a corrupted photo: changes {changes:?}, cut {cut:?}");
    }
}
