//! The quality gate's scores of each stored image (schema version 4), kept for the bay's own
//! use: `queue --json` and the `angle_captured` event show them. The cloud contract has no place
//! for them, so they are never uploaded.
//!
//! Columns added to `images`, all nullable so that rows stored before the gate stay valid
//! (`NULL`: not judged): `sharpness`, `dark_clipped`, `bright_clipped`, `mean_luma`, `glare`
//! (`REAL`, as `imaging::QualityScores` defines them) and `quality_reason` (`TEXT`: why the image
//! was stored below its camera's thresholds; `NULL` when it passed).

use std::collections::HashMap;

use rusqlite::{params, Connection};

use super::error::sqlite_error;
use super::{InspectionId, NewImage, Store, StoreError};
use crate::imaging::QualityScores;
use crate::vehicle::PhotoLabel;

/// The migration to schema version 4: the quality columns of `images`.
pub(super) const QUALITY_COLUMNS: &str = "
    ALTER TABLE images ADD COLUMN sharpness      REAL;
    ALTER TABLE images ADD COLUMN dark_clipped   REAL;
    ALTER TABLE images ADD COLUMN bright_clipped REAL;
    ALTER TABLE images ADD COLUMN mean_luma      REAL;
    ALTER TABLE images ADD COLUMN glare          REAL;
    ALTER TABLE images ADD COLUMN quality_reason TEXT;
";

/// An image's quality as stored with it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ImageQuality {
    #[serde(flatten)]
    pub scores: QualityScores,
    /// Why the image is below its camera's thresholds (every capture was); `None` when it
    /// passed.
    pub poor: Option<String>,
}

/// One stored image's quality, as `queue --json` lists it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct AngleQuality {
    pub angle: PhotoLabel,
    #[serde(flatten)]
    pub quality: ImageQuality,
}

impl Store {
    /// [`Store::add_image`] with the image's quality written in the same transaction.
    pub fn add_image_with_quality(
        &mut self,
        id: InspectionId,
        image: &NewImage<'_>,
        quality: &ImageQuality,
    ) -> Result<(), StoreError> {
        self.insert_image(id, image, Some(quality))
    }

    /// The quality of every judged image of every inspection, in the order they were stored
    /// (images stored before the gate existed are left out).
    pub fn image_qualities(&self) -> Result<HashMap<InspectionId, Vec<AngleQuality>>, StoreError> {
        self.read_qualities(None)
    }

    /// The quality of one inspection's judged images, in the order they were stored.
    pub fn image_quality(&self, id: InspectionId) -> Result<Vec<AngleQuality>, StoreError> {
        Ok(self.read_qualities(Some(id))?.remove(&id).unwrap_or_default())
    }

    fn read_qualities(
        &self,
        only: Option<InspectionId>,
    ) -> Result<HashMap<InspectionId, Vec<AngleQuality>>, StoreError> {
        let err = |e| sqlite_error(&self.path, e);
        let mut stmt = self
            .conn
            .prepare(
                "SELECT inspection_id, angle, sharpness, dark_clipped, bright_clipped, mean_luma, glare,
                        quality_reason
                 FROM images
                 WHERE sharpness IS NOT NULL AND (?1 IS NULL OR inspection_id = ?1)
                 ORDER BY inspection_id, rowid",
            )
            .map_err(err)?;
        let rows = stmt
            .query_map([only.map(|id| id.0)], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, String>(1)?,
                    ImageQuality {
                        scores: QualityScores {
                            sharpness: r.get(2)?,
                            dark_clipped: r.get::<_, Option<f64>>(3)?.unwrap_or_default(),
                            bright_clipped: r.get::<_, Option<f64>>(4)?.unwrap_or_default(),
                            mean_luma: r.get::<_, Option<f64>>(5)?.unwrap_or_default(),
                            glare: r.get::<_, Option<f64>>(6)?.unwrap_or_default(),
                        },
                        poor: r.get(7)?,
                    },
                ))
            })
            .map_err(err)?;
        let mut out: HashMap<InspectionId, Vec<AngleQuality>> = HashMap::new();
        for row in rows {
            let (id, angle, quality) = row.map_err(err)?;
            let id = InspectionId(id);
            let angle = PhotoLabel::parse(&angle).map_err(|e| self.unreadable(id, e.to_string()))?;
            out.entry(id).or_default().push(AngleQuality { angle, quality });
        }
        Ok(out)
    }
}

/// Writes an image's quality inside the transaction that inserts it.
pub(super) fn write(
    conn: &Connection,
    id: InspectionId,
    angle: PhotoLabel,
    quality: &ImageQuality,
) -> rusqlite::Result<()> {
    let s = &quality.scores;
    conn.execute(
        "UPDATE images SET sharpness = ?3, dark_clipped = ?4, bright_clipped = ?5, mean_luma = ?6,
                           glare = ?7, quality_reason = ?8
         WHERE inspection_id = ?1 AND angle = ?2",
        params![
            id.0,
            angle.as_str(),
            finite(s.sharpness),
            finite(s.dark_clipped),
            finite(s.bright_clipped),
            finite(s.mean_luma),
            finite(s.glare),
            quality.poor
        ],
    )?;
    Ok(())
}

/// SQLite stores a NaN as NULL; scores are finite, but a NaN must not make the image unreadable.
fn finite(value: f64) -> f64 {
    if value.is_finite() {
        value
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    use sha2::{Digest, Sha256};

    use super::*;
    use crate::store::{Caps, NewInspection, FILE_NAME};
    use crate::vehicle::CaseId;

    const CAPS: Caps = Caps { max_bytes: u64::MAX, min_free_disk: 0 };

    fn at(s: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_795_000_000 + s)
    }

    #[test]
    fn a_version_5_buffer_gains_empty_quality_columns_and_keeps_its_images() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        {
            // A buffer as version 5 left it: today's tables without the quality columns.
            let conn = super::super::schema::open(&path, true).unwrap().connection;
            for column in
                ["sharpness", "dark_clipped", "bright_clipped", "mean_luma", "glare", "quality_reason"]
            {
                conn.execute_batch(&format!("ALTER TABLE images DROP COLUMN {column}")).unwrap();
            }
            conn.pragma_update(None, "user_version", 5).unwrap();
            conn.execute(
                "INSERT INTO inspections (case_id, angles, state, created_at, updated_at)
                 VALUES ('CASE-OLD', '[\"Front\",\"Rear\"]', 'captured', 1, 1)",
                [],
            )
            .unwrap();
            let jpeg = b"old image bytes".to_vec();
            conn.execute(
                "INSERT INTO images (inspection_id, angle, camera, captured_at, source_width, source_height,
                                     source_bytes, width, height, bytes, sha256, jpeg)
                 VALUES (1, 'Front', 'cam', 1, 640, 480, 1000, 640, 480, ?1, ?2, ?3)",
                params![jpeg.len() as i64, hex::encode(Sha256::digest(&jpeg)), jpeg],
            )
            .unwrap();
        }
        let mut store = Store::open(dir.path(), CAPS, at(0)).unwrap();
        assert_eq!(store.recovery().migrated_from, Some(5));
        let old = InspectionId(1);
        assert_eq!(store.images(old).unwrap().len(), 1, "the old image is still there");
        assert_eq!(
            store.image_jpeg(old, PhotoLabel::Front).unwrap().as_deref(),
            Some(&b"old image bytes"[..])
        );
        assert!(
            store.image_quality(old).unwrap().is_empty(),
            "an image stored before the gate was not judged"
        );

        // New images are stored with their scores, in the same transaction.
        let case = CaseId::parse("CASE-NEW").unwrap();
        let angles = [PhotoLabel::Front, PhotoLabel::Rear];
        let id = store
            .begin_inspection(
                &NewInspection { case_id: &case, vehicle: None, angles: &angles, expected_image_bytes: 10 },
                at(1),
            )
            .unwrap();
        let image = |angle| NewImage {
            angle,
            camera: "cam",
            captured_at: at(2),
            source_width: 640,
            source_height: 480,
            source_bytes: 1000,
            width: 640,
            height: 480,
            jpeg: b"new image bytes",
        };
        let poor = ImageQuality {
            scores: QualityScores {
                sharpness: 12.5,
                dark_clipped: 0.01,
                bright_clipped: 0.02,
                mean_luma: 99.5,
                glare: 0.0,
            },
            poor: Some("blurred (sharpness 12.5, min_sharpness 25)".to_owned()),
        };
        store.add_image_with_quality(id, &image(PhotoLabel::Rear), &poor).unwrap();
        store.add_image(id, &image(PhotoLabel::Front)).unwrap();
        let stored = store.image_quality(id).unwrap();
        assert_eq!(stored, vec![AngleQuality { angle: PhotoLabel::Rear, quality: poor.clone() }]);
        let all = store.image_qualities().unwrap();
        assert_eq!((all.len(), all.get(&id).map(Vec::len)), (1, Some(1)));
        // A refused image writes no scores either.
        let again = store.add_image_with_quality(id, &image(PhotoLabel::Rear), &poor);
        assert!(matches!(again, Err(StoreError::AngleAlreadyStored { .. })), "{again:?}");
        let json = serde_json::to_value(&stored[0]).unwrap();
        assert_eq!(json["angle"], "Rear");
        assert_eq!(json["sharpness"], 12.5);
        assert_eq!(json["poor"], "blurred (sharpness 12.5, min_sharpness 25)");
    }
}
