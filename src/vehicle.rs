//! The vehicle side of an inspection: case ids, VINs, vehicle attributes and photo labels,
//! as newtypes that cannot hold a value the cloud API would reject.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Why a case id, VIN, vehicle attribute or photo label was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidValue {
    /// The case id is empty, longer than 64 characters or has a character outside `A-Z a-z 0-9 -`.
    #[error(
        "case_id {value:?} is invalid: {why}; use 1-64 characters of A-Z, a-z, 0-9 and '-' (e.g. CASE-12345)"
    )]
    CaseId { value: String, why: &'static str },
    /// The VIN is not 17 characters of `A-Z 0-9` without I, O and Q.
    #[error(
        "VIN {value:?} is invalid: {why}; a VIN is exactly 17 characters of A-Z and 0-9 without I, O or Q"
    )]
    Vin { value: String, why: String },
    /// The name is not one of the cloud API's photo labels.
    #[error("photo label {value:?} is unknown; use one of {}", PhotoLabel::names().join(", "))]
    PhotoLabel { value: String },
    /// A vehicle attribute other than the VIN is out of range.
    #[error("vehicle.{field} is invalid: {why}")]
    Vehicle { field: &'static str, why: String },
}

/// The integrator's identifier of one inspection: 1–64 characters of `A–Z a–z 0–9 -`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct CaseId(String);

impl CaseId {
    pub fn parse(value: &str) -> Result<CaseId, InvalidValue> {
        let why = if value.is_empty() {
            Some("it is empty")
        } else if value.chars().count() > 64 {
            Some("it is longer than 64 characters")
        } else if !value.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            Some("it has a character that is not a letter, a digit or '-'")
        } else {
            None
        };
        match why {
            Some(why) => Err(InvalidValue::CaseId { value: shorten(value), why }),
            None => Ok(CaseId(value.to_owned())),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for CaseId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for CaseId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(d)?;
        CaseId::parse(&raw).map_err(serde::de::Error::custom)
    }
}

/// A vehicle identification number: exactly 17 characters of `A–Z 0–9` without `I`, `O`, `Q`.
#[derive(Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct Vin(String);

impl Vin {
    pub fn parse(value: &str) -> Result<Vin, InvalidValue> {
        let len = value.chars().count();
        let why = if len < 17 {
            Some(format!("it is too short ({len} characters), it must be 17"))
        } else if len > 17 {
            Some(format!("it is too long ({len} characters), it must be 17"))
        } else if let Some(c) = value.chars().find(|c| matches!(c, 'I' | 'O' | 'Q')) {
            Some(format!("it contains {c:?}, which VINs never use"))
        } else {
            value
                .chars()
                .find(|c| !(c.is_ascii_uppercase() || c.is_ascii_digit()))
                .map(|c| format!("it contains {c:?}; only upper-case letters and digits are allowed"))
        };
        match why {
            Some(why) => Err(InvalidValue::Vin { value: shorten(value), why }),
            None => Ok(Vin(value.to_owned())),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// VINs are personal data: `Debug` shows only the manufacturer prefix.
impl fmt::Debug for Vin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Vin({}…)", &self.0[..3])
    }
}

impl fmt::Display for Vin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Vin {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(d)?;
        Vin::parse(&raw).map_err(serde::de::Error::custom)
    }
}

/// Odometer unit of PAVE's vehicle object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum OdometerUnit {
    Kilometres,
    Miles,
}

/// The vehicle object sent with `/api/authenticate` (PAVE's attributes; all optional but the VIN).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Vehicle {
    pub vin: Vin,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub year: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub make: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trim: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transmission: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ext_col: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub int_col: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub odom_reading: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub odom_unit: Option<OdometerUnit>,
}

impl Vehicle {
    /// A vehicle known only by its VIN.
    pub fn with_vin(vin: Vin) -> Vehicle {
        Vehicle {
            vin,
            year: None,
            make: None,
            model: None,
            body_type: None,
            trim: None,
            transmission: None,
            ext_col: None,
            int_col: None,
            odom_reading: None,
            odom_unit: None,
        }
    }

    /// Checks the attributes that serde cannot: text lengths and the model year.
    pub fn validate(&self) -> Result<(), InvalidValue> {
        if let Some(year) = self.year {
            if !(1886..=2100).contains(&year) {
                return Err(InvalidValue::Vehicle {
                    field: "year",
                    why: format!("{year} is not a plausible model year"),
                });
            }
        }
        let texts = [
            ("make", &self.make),
            ("model", &self.model),
            ("body_type", &self.body_type),
            ("trim", &self.trim),
            ("transmission", &self.transmission),
            ("ext_col", &self.ext_col),
            ("int_col", &self.int_col),
        ];
        for (field, value) in texts {
            if let Some(v) = value {
                if v.chars().count() > 128 || v.chars().any(char::is_control) {
                    return Err(InvalidValue::Vehicle {
                        field,
                        why: "it must be at most 128 printable characters".to_owned(),
                    });
                }
            }
        }
        Ok(())
    }
}

/// One of the cloud API's photo labels; each angle of an inspection is one label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PhotoLabel {
    Front,
    FrontLeft,
    Left,
    RearLeft,
    Rear,
    RearRight,
    Right,
    FrontRight,
    Vin,
    Odometer,
    Interior,
    Tires,
    Windshield,
    Undercarriage,
    Roof,
}

impl PhotoLabel {
    pub const ALL: [PhotoLabel; 15] = [
        PhotoLabel::Front,
        PhotoLabel::FrontLeft,
        PhotoLabel::Left,
        PhotoLabel::RearLeft,
        PhotoLabel::Rear,
        PhotoLabel::RearRight,
        PhotoLabel::Right,
        PhotoLabel::FrontRight,
        PhotoLabel::Vin,
        PhotoLabel::Odometer,
        PhotoLabel::Interior,
        PhotoLabel::Tires,
        PhotoLabel::Windshield,
        PhotoLabel::Undercarriage,
        PhotoLabel::Roof,
    ];

    /// The eight exterior angles of a drive-through, in the order a bay usually shoots them.
    pub const EXTERIOR: [PhotoLabel; 8] = [
        PhotoLabel::Front,
        PhotoLabel::FrontLeft,
        PhotoLabel::Left,
        PhotoLabel::RearLeft,
        PhotoLabel::Rear,
        PhotoLabel::RearRight,
        PhotoLabel::Right,
        PhotoLabel::FrontRight,
    ];

    /// The label exactly as the cloud API spells it (`Front_Left`).
    pub fn as_str(self) -> &'static str {
        match self {
            PhotoLabel::Front => "Front",
            PhotoLabel::FrontLeft => "Front_Left",
            PhotoLabel::Left => "Left",
            PhotoLabel::RearLeft => "Rear_Left",
            PhotoLabel::Rear => "Rear",
            PhotoLabel::RearRight => "Rear_Right",
            PhotoLabel::Right => "Right",
            PhotoLabel::FrontRight => "Front_Right",
            PhotoLabel::Vin => "VIN",
            PhotoLabel::Odometer => "Odometer",
            PhotoLabel::Interior => "Interior",
            PhotoLabel::Tires => "Tires",
            PhotoLabel::Windshield => "Windshield",
            PhotoLabel::Undercarriage => "Undercarriage",
            PhotoLabel::Roof => "Roof",
        }
    }

    pub fn names() -> Vec<&'static str> {
        PhotoLabel::ALL.iter().map(|l| l.as_str()).collect()
    }

    /// Parses a label exactly as the API spells it, or case-insensitively with `-` or `_`
    /// between words (`front-left`), so that file names and operator input both work.
    pub fn parse(value: &str) -> Result<PhotoLabel, InvalidValue> {
        let wanted = value.trim().replace('-', "_");
        PhotoLabel::ALL
            .into_iter()
            .find(|l| l.as_str().eq_ignore_ascii_case(&wanted))
            .ok_or_else(|| InvalidValue::PhotoLabel { value: shorten(value) })
    }
}

impl fmt::Display for PhotoLabel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for PhotoLabel {
    type Err = InvalidValue;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        PhotoLabel::parse(s)
    }
}

impl Serialize for PhotoLabel {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for PhotoLabel {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(d)?;
        PhotoLabel::parse(&raw).map_err(serde::de::Error::custom)
    }
}

/// Keeps error messages readable when the input is huge or hostile.
fn shorten(value: &str) -> String {
    const MAX: usize = 80;
    if value.chars().count() <= MAX {
        value.to_owned()
    } else {
        let head: String = value.chars().take(MAX).collect();
        format!("{head}…")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_case_id(input: &str, ok: bool) {
        assert_eq!(CaseId::parse(input).is_ok(), ok, "case_id {input:?}");
    }

    #[test]
    fn case_ids_follow_the_api_rules() {
        check_case_id("CASE-12345", true);
        check_case_id("12345", true);
        check_case_id("a", true);
        check_case_id(&"x".repeat(64), true);
        check_case_id(&"x".repeat(65), false);
        check_case_id("", false);
        check_case_id("CASE 1", false);
        check_case_id("CASE_1", false);
        check_case_id("../etc", false);
        check_case_id("CASÉ", false);
    }

    #[test]
    fn vins_follow_the_api_rules() {
        assert!(Vin::parse("JN1CV6AR9BM123456").is_ok());
        let short = Vin::parse("JN1CV6AR9BM12345").unwrap_err().to_string();
        assert!(short.contains("too short"), "{short}");
        assert!(Vin::parse("JN1CV6AR9BM1234567").unwrap_err().to_string().contains("too long"));
        assert!(Vin::parse("JN1CV6AR9BMI23456").unwrap_err().to_string().contains("'I'"));
        assert!(Vin::parse("jn1cv6ar9bm123456").is_err());
        assert!(Vin::parse("JN1CV6AR9BM12345-").is_err());
    }

    #[test]
    fn vin_debug_output_hides_the_serial_number() {
        let vin = Vin::parse("JN1CV6AR9BM123456").unwrap();
        let shown = format!("{:?}", Vehicle::with_vin(vin));
        assert!(!shown.contains("123456"), "{shown}");
    }

    #[test]
    fn photo_labels_parse_in_the_spellings_people_use() {
        assert_eq!(PhotoLabel::parse("Front_Left").unwrap(), PhotoLabel::FrontLeft);
        assert_eq!(PhotoLabel::parse("front-left").unwrap(), PhotoLabel::FrontLeft);
        assert_eq!(PhotoLabel::parse("vin").unwrap(), PhotoLabel::Vin);
        let err = PhotoLabel::parse("Sideways").unwrap_err().to_string();
        assert!(err.contains("Sideways") && err.contains("Front_Left"), "{err}");
        for label in PhotoLabel::ALL {
            assert_eq!(PhotoLabel::parse(label.as_str()).unwrap(), label);
        }
    }

    #[test]
    fn vehicle_json_rejects_unknown_fields_and_bad_values() {
        let ok: Vehicle =
            serde_json::from_str(r#"{"vin":"JN1CV6AR9BM123456","year":2011,"odom_unit":"KILOMETRES"}"#)
                .unwrap();
        assert_eq!(ok.year, Some(2011));
        assert!(serde_json::from_str::<Vehicle>(r#"{"vin":"JN1CV6AR9BM123456","colour":"red"}"#).is_err());
        assert!(serde_json::from_str::<Vehicle>(r#"{"vin":"SHORT"}"#).is_err());
        let old = Vehicle { year: Some(1700), ..ok };
        assert!(old.validate().is_err());
    }
}
