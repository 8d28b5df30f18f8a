//! `[display]`: the bay's own web server (the driver's screen, the installer's camera page).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::screen::Texts;
use crate::setting::{self, invalid, Invalid};
use crate::vehicle::PhotoLabel;

/// The checked `[display]` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DisplayConfig {
    /// Serve the pages at all (default: yes).
    pub enabled: bool,
    /// Where to listen; the screen is on the board itself, hence loopback by default.
    pub listen: SocketAddr,
    /// The camera page's bearer token: this file (owner-only), else the systemd credential
    /// `display-token`, else one the kiosk makes in its state directory.
    pub token_file: Option<PathBuf>,
    /// How others reach the pages (`http://bay-07.local:8080`): Home Assistant's link to the
    /// camera page. Unset when the pages are only on the board.
    pub public_url: Option<String>,
    /// The page's language (its `lang`), for the browser's hyphenation and voice.
    pub lang: String,
    /// How long "done" stays on the screen.
    pub done_for: Duration,
    /// How long "attention" stays unless the next car is started sooner.
    pub attention_for: Duration,
    pub texts: Texts,
}

impl Default for DisplayConfig {
    fn default() -> DisplayConfig {
        RawDisplay::default().check().unwrap_or_else(|_| unreachable!("the defaults are valid"))
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDisplay {
    #[serde(default = "yes")]
    enabled: bool,
    #[serde(default = "default_listen")]
    listen: String,
    token_file: Option<PathBuf>,
    public_url: Option<String>,
    #[serde(default = "default_lang")]
    lang: String,
    #[serde(default = "default_done")]
    done_for: String,
    #[serde(default = "default_attention")]
    attention_for: String,
    #[serde(default)]
    texts: RawTexts,
    #[serde(default)]
    angles: BTreeMap<String, String>,
}

fn yes() -> bool {
    true
}
fn default_listen() -> String {
    "127.0.0.1:8080".to_owned()
}
fn default_lang() -> String {
    "en".to_owned()
}
fn default_done() -> String {
    "20s".to_owned()
}
fn default_attention() -> String {
    "2 min".to_owned()
}

impl Default for RawDisplay {
    fn default() -> RawDisplay {
        RawDisplay {
            enabled: true,
            listen: default_listen(),
            token_file: None,
            public_url: None,
            lang: default_lang(),
            done_for: default_done(),
            attention_for: default_attention(),
            texts: RawTexts::default(),
            angles: BTreeMap::new(),
        }
    }
}

/// `[display.texts]`: any sentence left out keeps its English default.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTexts {
    opening: Option<String>,
    closed: Option<String>,
    waiting: Option<String>,
    capturing: Option<String>,
    done: Option<String>,
    attention: Option<String>,
}

impl RawDisplay {
    pub fn check(self) -> Result<DisplayConfig, Invalid> {
        let listen: SocketAddr = self.listen.trim().parse().map_err(|_| {
            invalid(
                "display.listen",
                format!("{:?} is not an address and port", self.listen),
                "write e.g. \"127.0.0.1:8080\" (the board's own screen) or \"0.0.0.0:8080\" (reachable from a laptop on the bay's network)",
            )
        })?;
        if let Some(url) = &self.public_url {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(invalid(
                    "display.public_url",
                    format!("{url:?} is not an http:// or https:// URL"),
                    "write how a laptop reaches the bay, e.g. \"http://bay-07.local:8080\"",
                ));
            }
        }
        let lang = self.lang.trim().to_owned();
        if lang.is_empty() || lang.len() > 35 || !lang.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        {
            return Err(invalid(
                "display.lang",
                format!("{:?} is not a language tag", self.lang),
                "write a language tag such as \"en\", \"de\" or \"pt-BR\"",
            ));
        }
        let hold_fix = "use 1 s to 1 hour, e.g. \"20s\"";
        let done_for = setting::duration_in_range(
            "display.done_for",
            &self.done_for,
            Duration::from_secs(1),
            Duration::from_secs(3600),
            hold_fix,
        )?;
        let attention_for = setting::duration_in_range(
            "display.attention_for",
            &self.attention_for,
            Duration::from_secs(1),
            Duration::from_secs(3600),
            hold_fix,
        )?;
        let mut texts = Texts::default();
        let t = self.texts;
        for (key, given, slot) in [
            ("opening", t.opening, &mut texts.opening),
            ("closed", t.closed, &mut texts.closed),
            ("waiting", t.waiting, &mut texts.waiting),
            ("capturing", t.capturing, &mut texts.capturing),
            ("done", t.done, &mut texts.done),
            ("attention", t.attention, &mut texts.attention),
        ] {
            if let Some(text) = given {
                *slot = one_line(&format!("display.texts.{key}"), text)?;
            }
        }
        for (label, name) in self.angles {
            if PhotoLabel::parse(&label).is_err() {
                return Err(invalid(
                    format!("display.angles.{label}"),
                    format!("{label:?} is not an angle"),
                    "name angles as in [inspection] angles, e.g. Front, Front_Left, Vin",
                ));
            }
            let name = one_line(&format!("display.angles.{label}"), name)?;
            texts.angles.insert(label, name);
        }
        Ok(DisplayConfig {
            enabled: self.enabled,
            listen,
            token_file: self.token_file,
            public_url: self.public_url.map(|u| u.trim_end_matches('/').to_owned()),
            lang,
            done_for,
            attention_for,
            texts,
        })
    }
}

/// A sentence for the screen: not empty, not longer than a screen can show in large type.
fn one_line(key: &str, text: String) -> Result<String, Invalid> {
    let text = text.trim().to_owned();
    if text.is_empty() || text.chars().count() > 80 {
        return Err(invalid(
            key,
            if text.is_empty() { "is empty".to_owned() } else { "is longer than 80 characters".to_owned() },
            "write a short sentence a driver reads at a glance from 3 m",
        ));
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(text: &str) -> Result<DisplayConfig, Invalid> {
        toml::from_str::<RawDisplay>(text).unwrap().check()
    }

    #[test]
    fn defaults_serve_the_screen_on_loopback_in_english() {
        let d = DisplayConfig::default();
        assert!(d.enabled);
        assert_eq!(d.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(d.texts.waiting, "Drive in slowly");
        assert_eq!(d.done_for, Duration::from_secs(20));
    }

    #[test]
    fn a_bay_abroad_localises_its_sentences_and_angles() {
        let d = check("lang = \"de\"\n[texts]\nwaiting = \"Langsam einfahren\"\n[angles]\nFront_Left = \"Vorne links\"\n")
            .unwrap();
        assert_eq!((d.lang.as_str(), d.texts.waiting.as_str()), ("de", "Langsam einfahren"));
        assert_eq!(d.texts.capturing, Texts::default().capturing);
        assert_eq!(d.texts.angles["Front_Left"], "Vorne links");
    }

    #[test]
    fn bad_values_name_the_key_and_the_fix() {
        for (text, key) in [
            ("listen = \"8080\"", "display.listen"),
            ("public_url = \"bay.local\"", "display.public_url"),
            ("lang = \"en us\"", "display.lang"),
            ("done_for = \"forever\"", "display.done_for"),
            ("[texts]\nwaiting = \"\"", "display.texts.waiting"),
            ("[angles]\nBonnet = \"Hood\"", "display.angles.Bonnet"),
        ] {
            let e = check(text).unwrap_err();
            assert_eq!(e.key, key, "{text}");
            assert!(!e.fix.is_empty());
        }
    }
}
