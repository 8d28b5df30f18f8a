//! `dir:PATH`: replays real JPEGs from a folder. A file named after the angle (`Front.jpg`,
//! `front_left.jpeg`, any case) is that angle's frame; otherwise the folder's JPEGs are used in
//! name order, round-robin. The folder is read at every capture, so files can be swapped live.

use std::path::{Path, PathBuf};

use super::{Camera, CaptureError};
use crate::vehicle::PhotoLabel;

pub struct DirectoryCamera {
    id: String,
    dir: PathBuf,
    next: usize,
}

impl DirectoryCamera {
    pub fn new(id: &str, dir: PathBuf) -> DirectoryCamera {
        DirectoryCamera { id: id.to_owned(), dir, next: 0 }
    }

    fn failure(&self, reason: String) -> CaptureError {
        CaptureError::NoFrame {
            camera: self.id.clone(),
            source_desc: format!("dir:{}", self.dir.display()),
            reason,
        }
    }
}

impl Camera for DirectoryCamera {
    fn capture(&mut self, angle: PhotoLabel) -> Result<Vec<u8>, CaptureError> {
        let files =
            jpeg_files(&self.dir).map_err(|e| self.failure(format!("the folder cannot be read: {e}")))?;
        let named = files.iter().find(|p| label_of(p) == Some(angle));
        let chosen = match named {
            Some(p) => p.clone(),
            None if files.is_empty() => {
                return Err(
                    self.failure("the folder has no .jpg or .jpeg file; copy real photos into it".to_owned())
                )
            }
            None => {
                let p = files[self.next % files.len()].clone();
                self.next = self.next.wrapping_add(1);
                p
            }
        };
        std::fs::read(&chosen).map_err(|e| self.failure(format!("{} cannot be read: {e}", chosen.display())))
    }
}

fn jpeg_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.is_file()
                && p.extension()
                    .and_then(|e| e.to_str())
                    .is_some_and(|e| e.eq_ignore_ascii_case("jpg") || e.eq_ignore_ascii_case("jpeg"))
        })
        .collect();
    files.sort();
    Ok(files)
}

fn label_of(path: &Path) -> Option<PhotoLabel> {
    path.file_stem().and_then(|s| s.to_str()).and_then(|s| PhotoLabel::parse(s).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn named_files_win_and_the_rest_go_round_robin() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("front_left.JPEG"), b"FL").unwrap();
        std::fs::write(tmp.path().join("a.jpg"), b"A").unwrap();
        std::fs::write(tmp.path().join("b.jpg"), b"B").unwrap();
        std::fs::write(tmp.path().join("notes.txt"), b"T").unwrap();
        let mut cam = DirectoryCamera::new("c", tmp.path().to_owned());
        assert_eq!(cam.capture(PhotoLabel::FrontLeft).unwrap(), b"FL");
        // Round-robin over all JPEGs in name order: a.jpg, b.jpg, front_left.JPEG.
        assert_eq!(cam.capture(PhotoLabel::Rear).unwrap(), b"A");
        assert_eq!(cam.capture(PhotoLabel::Rear).unwrap(), b"B");
        assert_eq!(cam.capture(PhotoLabel::Rear).unwrap(), b"FL");
        assert_eq!(cam.capture(PhotoLabel::Rear).unwrap(), b"A");
    }

    #[test]
    fn an_empty_or_missing_folder_says_so() {
        let tmp = tempfile::tempdir().unwrap();
        let mut cam = DirectoryCamera::new("c", tmp.path().to_owned());
        assert!(cam.capture(PhotoLabel::Front).unwrap_err().to_string().contains("no .jpg"));
        let mut gone = DirectoryCamera::new("c", tmp.path().join("missing"));
        assert!(gone.capture(PhotoLabel::Front).unwrap_err().to_string().contains("cannot be read"));
    }
}
