//! Effect templates: `{{path}}` placeholders in an effect's URL, headers and body, filled
//! from the command: `{{payload.a.b}}` (a dotted path; array items by index),
//! `{{command_id}}`, `{{tenant}}`, `{{correlation_id}}`, `{{saga}}`, `{{effect}}`. A missing
//! or null value renders as nothing; numbers, booleans, arrays and objects as JSON text.
//!
//! - Text (header values, body strings): the value as it is. A body string that is exactly
//!   one placeholder becomes the JSON value itself (numbers stay numbers).
//! - URLs ([`render_url`]): each value is percent-encoded for where it stands, so event data
//!   can fill a path segment or a query value but never change which resource is called:
//!
//! ```text
//!   http://host:8080/orders/{{payload.id}}/pay?note={{payload.note}}&c={{command_id}}
//!   └── authority ──┘└─ path ─────────────────┘└─ query ───────────────────────────┘
//!   no placeholder    one segment's data:        one value's data:
//!   (refused)         `/ ? # % space` -> %XX;    `& = + # % space` -> %XX
//!                     a segment that comes out
//!                     empty, `.` or `..`: refused
//! ```
//!
//! Both positions keep only RFC 3986's unreserved characters (`A-Z a-z 0-9 - . _ ~`) and
//! encode every other byte as `%XX` (UTF-8), which a server reads back as data in a path
//! segment and in a query value alike; what differs by position is what is refused.

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use serde_json::Value;

/// What a value keeps unencoded in a URL: the unreserved characters of RFC 3986.
const URL_VALUE: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~');

/// Why a URL template cannot be rendered with a command's values.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlTemplateError {
    #[error(
        "placeholder {{{{{placeholder}}}}} stands in the URL's scheme or host; values may only fill its path or query"
    )]
    InAuthority { placeholder: String },
    #[error(
        "path segment {segment:?} made with {{{{{placeholder}}}}} is empty or a dot segment; it would change which path is called"
    )]
    BadSegment { placeholder: String, segment: String },
}

/// Reads a dotted path (`payload.items.0.sku`) from the template context.
fn lookup<'v>(root: &'v Value, path: &str) -> Option<&'v Value> {
    let mut cur = root;
    for part in path.split('.') {
        cur = match cur {
            Value::Object(m) => m.get(part)?,
            Value::Array(a) => a.get(part.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    Some(cur)
}

/// A value as text: strings as they are, null or missing as nothing, the rest as JSON.
fn text_of(ctx: &Value, path: &str) -> String {
    match lookup(ctx, path) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => String::new(),
        Some(v) => v.to_string(),
    }
}

/// A template cut into literal text and placeholders (by their trimmed path). An unclosed
/// `{{` is text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Piece<'a> {
    Text(&'a str),
    Value(&'a str),
}

fn pieces(template: &str) -> Vec<Piece<'_>> {
    let mut out = Vec::new();
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        let after = &rest[start + 2..];
        let Some(end) = after.find("}}") else { break };
        if start > 0 {
            out.push(Piece::Text(&rest[..start]));
        }
        out.push(Piece::Value(after[..end].trim()));
        rest = &after[end + 2..];
    }
    if !rest.is_empty() {
        out.push(Piece::Text(rest));
    }
    out
}

/// Replaces `{{path}}` placeholders in text (header values, body strings), values as they are.
pub fn render_str(template: &str, ctx: &Value) -> String {
    let mut out = String::with_capacity(template.len());
    for piece in pieces(template) {
        match piece {
            Piece::Text(t) => out.push_str(t),
            Piece::Value(path) => out.push_str(&text_of(ctx, path)),
        }
    }
    out
}

/// Renders a JSON template: strings are rendered; a string that is exactly one placeholder
/// becomes the referenced value.
pub fn render_json(template: &Value, ctx: &Value) -> Value {
    match template {
        Value::String(s) => match pieces(s.trim()).as_slice() {
            [Piece::Value(path)] => lookup(ctx, path).cloned().unwrap_or(Value::Null),
            _ => Value::String(render_str(s, ctx)),
        },
        Value::Array(a) => Value::Array(a.iter().map(|v| render_json(v, ctx)).collect()),
        Value::Object(m) => Value::Object(m.iter().map(|(k, v)| (k.clone(), render_json(v, ctx))).collect()),
        other => other.clone(),
    }
}

/// Where in a URL the renderer is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    /// Scheme and authority (`http://host:port`): no placeholder allowed.
    Authority,
    Path,
    /// Query and fragment: values are data.
    Query,
}

/// The path segment being rendered: where it starts in the output and the first
/// placeholder in it.
struct Segment<'a> {
    start: usize,
    placeholder: Option<&'a str>,
}

impl<'a> Segment<'a> {
    /// Ends the segment at the end of `out`; a segment a value made empty, `.` or `..`
    /// would change the path (servers drop or resolve such segments).
    fn close(&self, out: &str) -> Result<(), UrlTemplateError> {
        let Some(placeholder) = self.placeholder else { return Ok(()) };
        let segment = &out[self.start..];
        if matches!(segment, "" | "." | "..") {
            return Err(UrlTemplateError::BadSegment {
                placeholder: placeholder.to_owned(),
                segment: segment.to_owned(),
            });
        }
        Ok(())
    }
}

/// Renders a URL template, each value percent-encoded for its position (see the module
/// map). The template's own text is kept as written.
pub fn render_url(template: &str, ctx: &Value) -> Result<String, UrlTemplateError> {
    let mut out = String::with_capacity(template.len() + 16);
    // Without `scheme://` the whole template is a path (and query).
    let mut part = if template.contains("://") { Part::Authority } else { Part::Path };
    let mut segment = Segment { start: 0, placeholder: None };
    for piece in pieces(template) {
        match piece {
            Piece::Value(path) => match part {
                Part::Authority => return Err(UrlTemplateError::InAuthority { placeholder: path.to_owned() }),
                Part::Path => {
                    segment.placeholder = segment.placeholder.or(Some(path));
                    out.extend(utf8_percent_encode(&text_of(ctx, path), URL_VALUE));
                }
                Part::Query => out.extend(utf8_percent_encode(&text_of(ctx, path), URL_VALUE)),
            },
            Piece::Text(text) => {
                for ch in text.chars() {
                    match (part, ch) {
                        // The authority ends at the first `/`, `?` or `#` after `://`.
                        (Part::Authority, '/' | '?' | '#') if out.contains("://") => {
                            part = if ch == '/' { Part::Path } else { Part::Query };
                            out.push(ch);
                            segment = Segment { start: out.len(), placeholder: None };
                        }
                        (Part::Path, '/') => {
                            segment.close(&out)?;
                            out.push(ch);
                            segment = Segment { start: out.len(), placeholder: None };
                        }
                        (Part::Path, '?' | '#') => {
                            segment.close(&out)?;
                            part = Part::Query;
                            out.push(ch);
                        }
                        _ => out.push(ch),
                    }
                }
            }
        }
    }
    if part == Part::Path {
        segment.close(&out)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ctx(payload: Value) -> Value {
        json!({"payload": payload, "command_id": "c-1", "tenant": "acme"})
    }

    #[test]
    fn text_templates_render_values_as_they_are() {
        let ctx = json!({"payload": {"amount": 40, "who": {"name": "ann"}}, "command_id": "c-1"});
        assert_eq!(render_str("/pay/{{payload.who.name}}?c={{command_id}}&x={{missing}}", &ctx), "/pay/ann?c=c-1&x=");
        assert_eq!(render_str("open {{ and }} stays", &ctx), "open  stays");
        assert_eq!(render_str("unclosed {{payload.amount", &ctx), "unclosed {{payload.amount");
        let body =
            json!({"amount": "{{payload.amount}}", "note": "for {{payload.who.name}}", "list": ["{{command_id}}"]});
        assert_eq!(render_json(&body, &ctx), json!({"amount": 40, "note": "for ann", "list": ["c-1"]}));
    }

    #[test]
    fn url_values_cannot_change_the_path_or_the_query() {
        let t = "http://up:80/orders/{{payload.id}}/pay?note={{payload.note}}&c={{command_id}}#{{payload.f}}";
        let c = ctx(json!({"id": "../admin?x=1", "note": "a&b=c+d #50% /é", "f": "x y"}));
        assert_eq!(
            render_url(t, &c).unwrap(),
            "http://up:80/orders/..%2Fadmin%3Fx%3D1/pay?note=a%26b%3Dc%2Bd%20%2350%25%20%2F%C3%A9&c=c-1#x%20y"
        );
        // Plain values pass unchanged; numbers render as text; a value inside a segment.
        let c = ctx(json!({"id": "o-1.v2_~", "note": 7, "f": null}));
        assert_eq!(render_url(t, &c).unwrap(), "http://up:80/orders/o-1.v2_~/pay?note=7&c=c-1#");
        assert_eq!(
            render_url("http://up/a/x{{payload.id}}.json", &ctx(json!({"id": "/"}))).unwrap(),
            "http://up/a/x%2F.json"
        );
        // No scheme: all of it is path and query.
        assert_eq!(render_url("/v1/{{payload.id}}", &ctx(json!({"id": "a b"}))).unwrap(), "/v1/a%20b");
    }

    #[test]
    fn a_value_that_would_empty_or_dot_a_path_segment_is_refused() {
        let t = "http://up/orders/{{payload.id}}/pay";
        for id in [json!(".."), json!("."), json!(""), Value::Null] {
            let e = render_url(t, &ctx(json!({"id": id}))).unwrap_err();
            assert!(
                matches!(&e, UrlTemplateError::BadSegment { placeholder, .. } if placeholder == "payload.id"),
                "{e}"
            );
        }
        // At the end of the path and before the query too.
        assert!(render_url("http://up/o/{{payload.id}}", &ctx(json!({"id": ".."}))).is_err());
        assert!(render_url("http://up/o/{{payload.id}}?x=1", &ctx(json!({"id": "."}))).is_err());
        // Dots inside a segment, and empty query values, are data.
        assert!(render_url("http://up/o/{{payload.id}}?x={{payload.q}}", &ctx(json!({"id": "...", "q": ""}))).is_ok());
        // The template's own text is not judged.
        assert_eq!(render_url("http://up/a/../b", &Value::Null).unwrap(), "http://up/a/../b");
    }

    #[test]
    fn placeholders_in_the_scheme_or_host_are_refused() {
        for t in [
            "http://{{payload.host}}/x",
            "http://up{{payload.port}}",
            "{{payload.scheme}}://up/x",
            "http://a@{{tenant}}:80?x",
        ] {
            let e = render_url(t, &ctx(json!({"host": "evil", "port": ":1", "scheme": "http"}))).unwrap_err();
            assert!(matches!(e, UrlTemplateError::InAuthority { .. }), "{t}: {e}");
        }
        let e = render_url("http://{{payload.host}}/x", &Value::Null).unwrap_err();
        assert_eq!(
            e.to_string(),
            "placeholder {{payload.host}} stands in the URL's scheme or host; values may only fill its path or query"
        );
    }
}
