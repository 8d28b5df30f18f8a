//! `multipart/form-data` (RFC 7578) as the stand-in reads it: the boundary from the
//! `Content-Type`, then parts with a `Content-Disposition` name and an optional filename.
//! Hostile input is refused with a reason, never a panic; the parser borrows the body it is
//! given (already bounded by the request size cap) and allocates only per part.

/// One part of the body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Part<'a> {
    pub name: String,
    pub filename: Option<String>,
    pub data: &'a [u8],
}

/// At most this many parts are read (99 files plus the text fields leave ample room).
pub(crate) const MAX_PARTS: usize = 200;
/// The header block of one part may not exceed this many bytes.
const MAX_PART_HEAD_BYTES: usize = 8 * 1024;

/// The boundary of a `multipart/form-data` content type, or why there is none.
pub(crate) fn boundary(content_type: &str) -> Result<String, String> {
    let (media_type, params) = parse_header_value(content_type)?;
    if !media_type.eq_ignore_ascii_case("multipart/form-data") {
        return Err(format!("Content-Type must be multipart/form-data, not {}", shorten(&media_type)));
    }
    let boundary = params
        .into_iter()
        .find(|(k, _)| k == "boundary")
        .map(|(_, v)| v)
        .ok_or("the multipart/form-data Content-Type has no boundary parameter")?;
    let valid_chars = boundary.bytes().all(|b| b.is_ascii_alphanumeric() || b"'()+_,-./:=? ".contains(&b));
    if boundary.is_empty() || boundary.len() > 70 || !valid_chars || boundary.ends_with(' ') {
        return Err("the multipart boundary must be 1-70 characters of RFC 2046 bchars".to_owned());
    }
    Ok(boundary)
}

/// Splits the body into parts. The close delimiter must be present.
pub(crate) fn parse<'a>(body: &'a [u8], boundary: &str) -> Result<Vec<Part<'a>>, String> {
    let delimiter = [b"--", boundary.as_bytes()].concat();
    let separator = [b"\r\n--", boundary.as_bytes()].concat();
    let mut pos = if body.starts_with(&delimiter) {
        delimiter.len()
    } else {
        // A preamble before the first delimiter is allowed and ignored.
        find(body, &separator, 0).ok_or("the multipart body does not contain its boundary")? + separator.len()
    };
    let mut parts = Vec::new();
    loop {
        let rest = &body[pos..];
        if rest.starts_with(b"--") {
            return Ok(parts); // the close delimiter; an epilogue is ignored
        }
        let padding = rest.iter().take_while(|b| **b == b' ' || **b == b'\t').count();
        if !rest[padding..].starts_with(b"\r\n") {
            return Err("the multipart body is truncated or a boundary is not followed by CRLF".to_owned());
        }
        pos += padding + 2;
        if parts.len() == MAX_PARTS {
            return Err(format!("the multipart body has more than {MAX_PARTS} parts"));
        }
        let (head, data_start) = if body[pos..].starts_with(b"\r\n") {
            (&body[pos..pos], pos + 2)
        } else {
            let window = &body[pos..body.len().min(pos + MAX_PART_HEAD_BYTES)];
            let end = find(window, b"\r\n\r\n", 0).ok_or("a part's headers are too long or do not end")?;
            (&body[pos..pos + end], pos + end + 4)
        };
        let (name, filename) = parse_part_head(head)?;
        let data_end = find_delimiter(body, &separator, data_start)
            .ok_or("the multipart body is truncated: its close delimiter is missing")?;
        parts.push(Part { name, filename, data: &body[data_start..data_end] });
        pos = data_end + separator.len();
    }
}

fn parse_part_head(head: &[u8]) -> Result<(String, Option<String>), String> {
    let head = std::str::from_utf8(head).map_err(|_| "a part's headers are not UTF-8")?;
    let mut disposition = None;
    for line in head.split("\r\n") {
        let (name, value) = line.split_once(':').ok_or("a part's header line has no colon")?;
        if name.trim_end() != name || name.is_empty() {
            return Err("a part's header name is malformed".to_owned());
        }
        if name.eq_ignore_ascii_case("content-disposition") {
            if disposition.is_some() {
                return Err("a part has two Content-Disposition headers".to_owned());
            }
            disposition = Some(value.trim());
        }
    }
    let disposition = disposition.ok_or("a part has no Content-Disposition header")?;
    let (kind, params) = parse_header_value(disposition)?;
    if !kind.eq_ignore_ascii_case("form-data") {
        return Err("a part's Content-Disposition is not form-data".to_owned());
    }
    let mut name = None;
    let mut filename = None;
    for (key, value) in params {
        match key.as_str() {
            "name" => name = Some(value),
            "filename" => filename = Some(value),
            _ => {}
        }
    }
    let name = name.ok_or("a part's Content-Disposition has no name")?;
    Ok((name, filename))
}

/// `type/subtype; key=value; key="quoted \" value"` into the first token and the parameters
/// (keys in lower case). Duplicate parameters are refused.
fn parse_header_value(value: &str) -> Result<(String, Vec<(String, String)>), String> {
    let malformed = || format!("the header value {} is malformed", shorten(value));
    let (first, mut rest) = match value.find(';') {
        Some(i) => (&value[..i], &value[i + 1..]),
        None => (value, ""),
    };
    let first = first.trim();
    if first.is_empty() {
        return Err(malformed());
    }
    let mut params: Vec<(String, String)> = Vec::new();
    loop {
        rest = rest.trim_start_matches([' ', '\t']);
        if rest.is_empty() {
            break;
        }
        let eq = rest.find('=').ok_or_else(malformed)?;
        let key = rest[..eq].trim().to_ascii_lowercase();
        if key.is_empty() || key.contains([';', '"', ' ']) {
            return Err(malformed());
        }
        rest = rest[eq + 1..].trim_start_matches([' ', '\t']);
        let val;
        if let Some(quoted) = rest.strip_prefix('"') {
            let mut out = String::new();
            let mut chars = quoted.char_indices();
            let mut end = None;
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' => out.push(chars.next().ok_or_else(malformed)?.1),
                    '"' => {
                        end = Some(i);
                        break;
                    }
                    _ => out.push(c),
                }
            }
            let end = end.ok_or_else(malformed)?;
            val = out;
            rest = quoted[end + 1..].trim_start_matches([' ', '\t']);
            match rest.strip_prefix(';') {
                Some(r) => rest = r,
                None if rest.is_empty() => {}
                None => return Err(malformed()),
            }
        } else {
            let end = rest.find(';').unwrap_or(rest.len());
            val = rest[..end].trim().to_owned();
            rest = rest.get(end + 1..).unwrap_or("");
        }
        if params.iter().any(|(k, _)| *k == key) {
            return Err(format!("the parameter {key} appears twice in {}", shorten(value)));
        }
        params.push((key, val));
    }
    Ok((first.to_owned(), params))
}

/// The next `CRLF--boundary` that is a real delimiter: followed by `--` or by optional
/// whitespace and CRLF (RFC 2046). A look-alike inside the data is skipped.
fn find_delimiter(body: &[u8], separator: &[u8], from: usize) -> Option<usize> {
    let mut from = from;
    loop {
        let at = find(body, separator, from)?;
        let after = &body[at + separator.len()..];
        let padding = after.iter().take_while(|b| **b == b' ' || **b == b'\t').count();
        if after.starts_with(b"--") || after[padding..].starts_with(b"\r\n") {
            return Some(at);
        }
        from = at + 1;
    }
}

/// The first occurrence of `needle` in `hay` at or after `from`. Linear for our needles
/// (CR appears only as the first byte of a separator, and boundaries cannot contain it).
pub(crate) fn find(hay: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    let first = *needle.first()?;
    let mut i = from;
    while i + needle.len() <= hay.len() {
        let offset = hay[i..=hay.len() - needle.len()].iter().position(|b| *b == first)?;
        i += offset;
        if hay[i..].starts_with(needle) {
            return Some(i);
        }
        i += 1;
    }
    None
}

fn shorten(value: &str) -> String {
    let mut out: String = value.chars().take(80).collect();
    if out.len() < value.len() {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(parts: &[(&str, Option<&str>, &[u8])]) -> Vec<u8> {
        let mut out = Vec::new();
        for (name, filename, data) in parts {
            out.extend_from_slice(b"--XyZ\r\n");
            match filename {
                Some(f) => out.extend_from_slice(
                    format!("Content-Disposition: form-data; name=\"{name}\"; filename=\"{f}\"\r\nContent-Type: image/jpeg\r\n\r\n").as_bytes(),
                ),
                None => out.extend_from_slice(format!("Content-Disposition: form-data; name=\"{name}\"\r\n\r\n").as_bytes()),
            }
            out.extend_from_slice(data);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"--XyZ--\r\n");
        out
    }

    #[test]
    fn parts_come_back_with_names_filenames_and_exact_bytes() {
        let data: &[u8] = b"\xff\xd8\xff\r\n--XyZ-not-quite\r\n\xff\xd9";
        let raw = body(&[("type", None, b"file"), ("files", Some("Front.jpg"), data)]);
        let parts = parse(&raw, "XyZ").unwrap();
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[0], Part { name: "type".into(), filename: None, data: b"file" });
        assert_eq!(parts[1].filename.as_deref(), Some("Front.jpg"));
        assert_eq!(parts[1].data, data);
    }

    #[test]
    fn boundaries_come_from_the_content_type() {
        assert_eq!(boundary("multipart/form-data; boundary=abc").unwrap(), "abc");
        assert_eq!(boundary("Multipart/Form-Data; charset=x; boundary=\"a b:c\"").unwrap(), "a b:c");
        assert!(boundary("application/json").is_err());
        assert!(boundary("multipart/form-data").is_err());
        assert!(boundary("multipart/form-data; boundary=").is_err());
        assert!(boundary(&format!("multipart/form-data; boundary={}", "a".repeat(71))).is_err());
        assert!(boundary("multipart/form-data; boundary=\"unterminated").is_err());
        assert!(boundary("multipart/form-data; boundary=a; boundary=b").is_err());
    }

    #[test]
    fn hostile_bodies_are_refused_without_panicking() {
        let good = body(&[("files", Some("Front.jpg"), b"\xff\xd8\xff\xd9")]);
        for cut in 0..good.len() - 4 {
            assert!(parse(&good[..cut], "XyZ").is_err(), "cut at {cut}");
        }
        assert!(parse(b"--XyZ\r\nContent-Disposition: attachment; name=\"a\"\r\n\r\nx\r\n--XyZ--", "XyZ")
            .is_err());
        assert!(parse(b"--XyZ\r\nX: y\r\n\r\nx\r\n--XyZ--", "XyZ").is_err());
        assert!(parse(b"--XyZ\r\nContent-Disposition: form-data\r\n\r\nx\r\n--XyZ--", "XyZ").is_err());
        let many: Vec<(&str, Option<&str>, &[u8])> =
            (0..=MAX_PARTS).map(|_| ("a", None, &b"x"[..])).collect();
        assert!(parse(&body(&many), "XyZ").unwrap_err().contains("more than"));
        let cr_flood =
            [b"--XyZ\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\n".as_slice(), &[b'\r'; 100_000]]
                .concat();
        assert!(parse(&cr_flood, "XyZ").is_err());
        let long_head =
            [b"--XyZ\r\nContent-Disposition: form-data; name=\"a\"".as_slice(), &[b'x'; 10_000]].concat();
        assert!(parse(&long_head, "XyZ").is_err());
    }

    proptest::proptest! {
        #[test]
        fn any_bytes_parse_or_are_refused_without_panicking(
            body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512),
            content_type in "[ -~]{0,80}",
        ) {
            let _ = boundary(&content_type);
            let _ = parse(&body, "XyZ");
            let _ = super::super::http::parse_head(&body);
        }

        #[test]
        fn mutated_bodies_parse_or_are_refused_without_panicking(cut in 0usize..200, flip in 0usize..200, byte in 0u8..=255) {
            let mut raw = body(&[("type", None, b"file"), ("files", Some("Front.jpg"), b"\xff\xd8\xff\xd9")]);
            let flip = flip % raw.len();
            raw[flip] = byte;
            raw.truncate(raw.len().saturating_sub(cut));
            let _ = parse(&raw, "XyZ");
        }
    }

    #[test]
    fn a_preamble_and_an_epilogue_are_ignored() {
        let raw = [b"preamble\r\n".as_slice(), &body(&[("type", None, b"file")]), b"epilogue"].concat();
        let parts = parse(&raw, "XyZ").unwrap();
        assert_eq!(parts.len(), 1);
        assert_eq!(parts[0].data, b"file");
    }
}
