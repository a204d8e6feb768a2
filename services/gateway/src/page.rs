//! `GET /`: the demo chat page, embedded in the binary (no build step).
//!
//! The page is one file with one inline `<style>` and one inline `<script>`. Its
//! Content-Security-Policy allows exactly those two blocks by their SHA-256 hashes (computed
//! once from the embedded file) instead of `'unsafe-inline'`, so an injected script, style or
//! event-handler attribute does not run, and the page may only talk to its own origin.

use std::sync::LazyLock;

use actix_web::HttpResponse;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use sha2::{Digest, Sha256};

const INDEX: &str = include_str!("../static/index.html");

static CSP: LazyLock<String> = LazyLock::new(|| content_security_policy(INDEX));

/// The demo chat page.
#[utoipa::path(
    get, path = "/", tag = "page", operation_id = "demoPage",
    responses((status = 200, description = "The demo chat page", content_type = "text/html",
        body = String)),
)]
pub async fn index() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/html; charset=utf-8")
        .insert_header(("Cache-Control", "no-cache"))
        .insert_header(("X-Content-Type-Options", "nosniff"))
        .insert_header(("X-Frame-Options", "DENY"))
        .insert_header(("Referrer-Policy", "no-referrer"))
        .insert_header(("Content-Security-Policy", CSP.as_str()))
        .body(INDEX)
}

/// The policy for `html`: its inline `<script>` and `<style>` blocks by hash, `fetch` and
/// `EventSource` to the same origin only, no frames, plugins, base or foreign form targets.
pub fn content_security_policy(html: &str) -> String {
    let scripts = inline_hashes(html, "script").join(" ");
    let styles = inline_hashes(html, "style").join(" ");
    format!(
        "default-src 'none'; script-src {scripts}; style-src {styles}; connect-src 'self'; \
         img-src 'self' data:; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    )
}

/// `'sha256-…'` sources for the contents of every `<tag>…</tag>` block (opening tags without
/// attributes, as the page writes them).
fn inline_hashes(html: &str, tag: &str) -> Vec<String> {
    let open = format!("<{tag}>");
    let close = format!("</{tag}>");
    let mut hashes = Vec::new();
    let mut rest = html;
    while let Some(start) = rest.find(&open) {
        let body = &rest[start + open.len()..];
        let Some(end) = body.find(&close) else {
            break;
        };
        let digest = Sha256::digest(&body.as_bytes()[..end]);
        hashes.push(format!("'sha256-{}'", STANDARD.encode(digest)));
        rest = &body[end + close.len()..];
    }
    hashes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_are_over_the_exact_block_contents() {
        // echo -n "alert(1)" | openssl dgst -sha256 -binary | base64
        let html = "<p>x</p><script>alert(1)</script><style>p{}</style>";
        let csp = content_security_policy(html);
        assert!(
            csp.contains("script-src 'sha256-bhHHL3z2vDgxUt0W3dWQOrprscmda2Y5pLsLg4GF+pI='"),
            "{csp}"
        );
        assert_eq!(inline_hashes(html, "style").len(), 1);
        assert!(!csp.contains("unsafe-inline"));
    }

    #[test]
    fn the_page_has_exactly_one_hashable_script_and_style() {
        assert_eq!(inline_hashes(INDEX, "script").len(), 1);
        assert_eq!(inline_hashes(INDEX, "style").len(), 1);
        // Blocks with attributes or inline attributes would be blocked by the policy.
        assert_eq!(
            INDEX.matches("<script").count(),
            1,
            "one <script>, no attributes"
        );
        assert_eq!(
            INDEX.matches("<style").count(),
            1,
            "one <style>, no attributes"
        );
        assert!(
            !INDEX.contains(" style=\""),
            "style attributes are blocked by the CSP"
        );
        for handler in [
            " onclick=",
            " onload=",
            " onsubmit=",
            " oninput=",
            " onchange=",
        ] {
            assert!(
                !INDEX.contains(handler),
                "{handler} attributes are blocked by the CSP"
            );
        }
    }
}
