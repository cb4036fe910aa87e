//! `If-None-Match` (RFC 9110 §13.1.2): whether a `GET` may be answered `304 Not Modified`.

/// Whether the `If-None-Match` header `value` matches the representation whose entity tag
/// is `etag` (in its wire form, quotes included, optionally `W/`-prefixed), so that the
/// request's condition is false and a `GET` is answered `304 Not Modified`.
///
/// RFC 9110 §13.1.2: `*` matches any current representation; otherwise the field is a
/// comma-separated list of entity tags compared with the *weak* comparison (§8.8.3.2), so
/// `W/"x"` matches `"x"` and the other way round. A comma may appear inside a quoted tag,
/// so the list is scanned tag by tag, not split on commas. A field that is not a valid
/// list matches nothing: the request proceeds as if it had no condition.
pub(crate) fn if_none_match(value: &str, etag: &str) -> bool {
    let Some(current) = opaque_tag(etag) else {
        return false;
    };
    if value.trim() == "*" {
        return true;
    }
    let mut rest = value;
    loop {
        rest = rest.trim_start_matches([' ', '\t', ',']);
        if rest.is_empty() {
            return false;
        }
        let Some((tag, after)) = next_tag(rest) else {
            return false;
        };
        if tag == current {
            return true;
        }
        rest = after;
        // Tags are separated by a comma (with optional whitespace around it).
        let trimmed = rest.trim_start_matches([' ', '\t']);
        if !trimmed.is_empty() && !trimmed.starts_with(',') {
            return false;
        }
    }
}

/// The opaque part (quotes included) of an entity tag `[W/]"..."`, if it is one.
fn opaque_tag(etag: &str) -> Option<&str> {
    match next_tag(etag.trim()) {
        Some((tag, "")) => Some(tag),
        _ => None,
    }
}

/// Splits the entity tag at the start of `s` from what follows: (`"opaque"`, rest).
///
/// `entity-tag = [ weak ] opaque-tag`, `opaque-tag = DQUOTE *etagc DQUOTE`, and `etagc` is
/// any visible character but `"` (plus obs-text).
fn next_tag(s: &str) -> Option<(&str, &str)> {
    let s = s.strip_prefix("W/").unwrap_or(s);
    let inner = s.strip_prefix('"')?;
    let end = inner.find('"')?;
    if !inner[..end]
        .bytes()
        .all(|b| b == 0x21 || (0x23..=0x7e).contains(&b) || b >= 0x80)
    {
        return None;
    }
    Some((&s[..end + 2], &inner[end + 1..]))
}

#[cfg(test)]
mod tests {
    use super::if_none_match;

    #[test]
    fn star_lists_and_weak_tags() {
        let etag = "\"e:7\"";
        assert!(if_none_match("\"e:7\"", etag));
        assert!(if_none_match("*", etag));
        assert!(if_none_match(" * ", etag));
        assert!(if_none_match("W/\"e:7\"", etag));
        assert!(if_none_match("\"a\", W/\"e:7\"", etag));
        assert!(if_none_match("\"a\",\"b\" ,\t\"e:7\"", etag));
        assert!(if_none_match("\"e:7\"", "W/\"e:7\""));
        assert!(if_none_match("\"x,y\", \"e:7\"", etag));
        assert!(!if_none_match("\"x,e:7\"", etag));
        assert!(!if_none_match("\"e:8\"", etag));
        assert!(!if_none_match("e:7", etag));
        assert!(!if_none_match("", etag));
        assert!(!if_none_match("\"e:7", etag));
        assert!(!if_none_match("\"a\" \"e:7\"", etag));
        assert!(!if_none_match("w/\"e:7\"", etag));
        assert!(!if_none_match("\"e 7\"", "\"e 7\""));
    }
}
