//! Route templates: a request path reduced to a bounded label (`/v2.1/servers/{id}/action`).
//!
//! Ids are recognised by shape (uuid, hex, numbers, long mixed tokens) and by position
//! (the segment after a collection whose members are named freely: flavors, traits,
//! tags, stacks, …). Deep tails fold into `{tail}`. The per-service cap on distinct
//! templates is applied by the caller.

/// Segments kept; deeper paths end in `{tail}`.
const MAX_SEGMENTS: usize = 7;

/// Collections whose members are addressed by a free-form name, not an id.
const NAMED_MEMBERS: &[&str] = &[
    "flavors",
    "os-keypairs",
    "os-extra_specs",
    "metadata",
    "tags",
    "traits",
    "resource_classes",
    "inventories",
    "stacks",
    "resources",
    "schemas",
    "os-hypervisors",
    "os-availability-zone",
    "extra_specs",
    "buckets",
];

/// Words that stay literal even where a name is expected (`/flavors/detail`).
const RESERVED: &[&str] = &[
    "detail", "action", "defaults", "search", "servers", "events",
];

/// What `id_shaped` asks of each byte, one bit a question.
const DIGIT: u8 = 1;
const DASH: u8 = 2;
/// A hex digit or a dash (uuids, keystone's hex32).
const HEXISH: u8 = 4;
/// The API's own alphabet: letters, digits, `_ - . :`.
const WORDISH: u8 = 8;

/// Each byte's answers to `id_shaped`'s questions: a segment is read once, one lookup a
/// byte, where each question had its own pass (up to five over a uuid).
static CLASS: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut c = 0;
    while c < 256 {
        let b = c as u8;
        let mut k = 0;
        if b.is_ascii_digit() {
            k |= DIGIT;
        }
        if b == b'-' {
            k |= DASH;
        }
        if b.is_ascii_hexdigit() || b == b'-' {
            k |= HEXISH;
        }
        if b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':') {
            k |= WORDISH;
        }
        t[c] = k;
        c += 1;
    }
    t
};

/// Looks like an identifier rather than a word of the API.
fn id_shaped(s: &str) -> bool {
    let b = s.as_bytes();
    if b.is_empty() {
        return false;
    }
    let (mut digits, mut dashes, mut all) = (0usize, 0usize, HEXISH | WORDISH);
    for &c in b {
        let k = CLASS[c as usize];
        digits += usize::from(k & DIGIT);
        dashes += usize::from((k & DASH) >> 1);
        all &= k;
    }
    if digits == b.len() {
        return true;
    }
    // uuid (dashed or not), keystone hex32, short hex ids with digits
    if b.len() - dashes >= 8 && digits > 0 && all & HEXISH != 0 {
        return true;
    }
    if let Some(rest) = s.strip_prefix("req-") {
        return rest.len() >= 8;
    }
    // long tokens mixing letters and digits; anything outside the API's alphabet
    (b.len() >= 16 && digits >= 2) || all & WORDISH == 0
}

/// The question-by-question reading `CLASS` replaces, kept to test it against.
#[cfg(test)]
fn id_shaped_by_passes(s: &str) -> bool {
    let b = s.as_bytes();
    if b.is_empty() {
        return false;
    }
    if b.iter().all(u8::is_ascii_digit) {
        return true;
    }
    let digits = b.iter().filter(|c| c.is_ascii_digit()).count();
    let dashes = b.iter().filter(|c| **c == b'-').count();
    if b.len() - dashes >= 8 && digits > 0 && b.iter().all(|c| c.is_ascii_hexdigit() || *c == b'-')
    {
        return true;
    }
    if let Some(rest) = s.strip_prefix("req-") {
        return rest.len() >= 8;
    }
    (b.len() >= 16 && digits >= 2)
        || !b
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'-' | b'.' | b':'))
}

fn is_version(s: &str) -> bool {
    let Some(v) = s.strip_prefix('v') else {
        return false;
    };
    !v.is_empty() && v.bytes().all(|c| c.is_ascii_digit() || c == b'.')
}

/// The template of `path` for `service` (a service type name such as "nova"), the
/// deployment prefix already removed.
pub fn template(service: Option<&str>, path: &str) -> String {
    if path == "*" {
        return "*".into();
    }
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    if segs.is_empty() {
        return "/".into();
    }
    let mut out: Vec<&str> = Vec::with_capacity(segs.len().min(MAX_SEGMENTS + 1));
    if service == Some("swift") && segs[0] == "v1" {
        // /v1/{account}/{container}/{object…}: the object name may hold slashes
        out.push("v1");
        for (i, name) in ["{account}", "{container}", "{object}"].iter().enumerate() {
            if segs.len() > i + 1 {
                out.push(name);
            }
        }
        return join(&out);
    }
    for (i, seg) in segs.iter().enumerate() {
        if out.len() == MAX_SEGMENTS {
            out.push("{tail}");
            break;
        }
        let prev = out.last().copied();
        let t = if i == 0 && is_version(seg) {
            seg
        } else if i == 1
            && prev.is_some_and(is_version)
            && project_scoped(service)
            && id_shaped(seg)
        {
            "{project_id}"
        } else if seg.starts_with("AUTH_") {
            "{account}"
        } else if prev.is_some_and(|p| NAMED_MEMBERS.contains(&p)) && !RESERVED.contains(seg) {
            "{name}"
        } else if id_shaped(seg) || seg.len() > 48 {
            "{id}"
        } else {
            seg
        };
        out.push(t);
    }
    join(&out)
}

/// Services whose URLs may carry the project id after the version.
fn project_scoped(service: Option<&str>) -> bool {
    matches!(service, Some("nova" | "cinder" | "heat") | None)
}

fn join(segs: &[&str]) -> String {
    let mut s = String::with_capacity(segs.iter().map(|x| x.len() + 1).sum());
    for seg in segs {
        s.push('/');
        s.push_str(seg);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_pass_reads_segments_as_the_question_by_question_reading() {
        let words = [
            "",
            "1",
            "12345678",
            "servers",
            "detail",
            "v2.1",
            "req-",
            "req-12345678",
            "req-0b7a3c37-8d36-4d52-9c53-ef4d0f0e3a11",
            "0b7a3c37-8d36-4d52-9c53-ef4d0f0e3a11",
            "4a3b9c2d1e0f4a5b8c7d6e5f4a3b2c1d",
            "deadbeef",
            "deadbee1",
            "--------1",
            "m1.tiny",
            "CUSTOM_GPU",
            "os-server-external-events",
            "a b",
            "é",
            "x%20y",
            "abcdefghijklmnop12",
            "abcdefghijklmno1",
            "ab:cd",
            "0x1F",
        ];
        for w in words {
            assert_eq!(id_shaped(w), id_shaped_by_passes(w), "{w:?}");
        }
        // every byte value in each position of an id-like, a word-like and a numeric segment
        for c in 0..=255u8 {
            for base in ["0b7a3c37-8d36-4d52", "resource_providers", "12345678"] {
                for at in 0..base.len() {
                    let mut v = base.as_bytes().to_vec();
                    v[at] = c;
                    if let Ok(s) = std::str::from_utf8(&v) {
                        assert_eq!(id_shaped(s), id_shaped_by_passes(s), "{s:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn openstack_paths_template_as_the_api_reference_names_them() {
        let cases = [
            (
                "nova",
                "/v2.1/servers/0b7a3c37-8d36-4d52-9c53-ef4d0f0e3a11/action",
                "/v2.1/servers/{id}/action",
            ),
            (
                "nova",
                "/v2.1/4a3b9c2d1e0f4a5b8c7d6e5f4a3b2c1d/servers/detail",
                "/v2.1/{project_id}/servers/detail",
            ),
            ("nova", "/v2.1/flavors/m1.tiny", "/v2.1/flavors/{name}"),
            ("nova", "/v2.1/flavors/detail", "/v2.1/flavors/detail"),
            (
                "neutron",
                "/v2.0/ports/9a3c0b7a-3c37-4d36-8d52-9c53ef4d0f0e",
                "/v2.0/ports/{id}",
            ),
            ("keystone", "/v3/auth/tokens", "/v3/auth/tokens"),
            (
                "keystone",
                "/v3/users/4a3b9c2d1e0f4a5b8c7d6e5f4a3b2c1d/projects",
                "/v3/users/{id}/projects",
            ),
            (
                "placement",
                "/resource_providers/0b7a3c37-8d36-4d52-9c53-ef4d0f0e3a11/inventories/VCPU",
                "/resource_providers/{id}/inventories/{name}",
            ),
            ("placement", "/traits/CUSTOM_GPU", "/traits/{name}"),
            (
                "swift",
                "/v1/AUTH_4a3b9c2d1e0f4a5b8c7d6e5f4a3b2c1d/photos/2024/a.jpg",
                "/v1/{account}/{container}/{object}",
            ),
            (
                "heat",
                "/v1/4a3b9c2d1e0f/stacks/web/0b7a3c37-8d36-4d52-9c53-ef4d0f0e3a11/resources",
                "/v1/{project_id}/stacks/{name}/{id}/resources",
            ),
            (
                "glance",
                "/v2/images/12/tags/gold",
                "/v2/images/{id}/tags/{name}",
            ),
            ("glance", "/", "/"),
        ];
        for (svc, path, want) in cases {
            assert_eq!(template(Some(svc), path), want, "{path}");
        }
    }

    #[test]
    fn templates_are_bounded_in_depth_and_shape() {
        let deep = "/a/b/c/d/e/f/g/h/i/j";
        assert_eq!(template(None, deep), "/a/b/c/d/e/f/g/{tail}");
        assert_eq!(template(None, "/x/%2e%2e/y"), "/x/{id}/y");
        assert_eq!(template(None, &format!("/x/{}", "a".repeat(60))), "/x/{id}");
        assert_eq!(template(None, "/comment/"), "/comment");
        assert_eq!(template(None, "/x/req-0b7a3c37-8d36"), "/x/{id}");
    }
}
