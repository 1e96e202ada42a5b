//! Command-line error wording shared by the binaries (controller, webhook, credential provider),
//! which print their own usage and list every problem of a command line at once.

/// clap's message on one line, without its `error: ` prefix and usage footer:
/// `the following required arguments were not provided: --proxy-host <PROXY_HOST>`. Takes the
/// error's text (so this crate needs no clap).
pub fn one_line(error_text: &str) -> String {
    let body = error_text.split("\n\n").next().unwrap_or_default();
    let body = body.strip_prefix("error: ").unwrap_or(body);
    body.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    #[test]
    fn first_paragraph_on_one_line() {
        let text = "error: the following required arguments were not provided:\n  --proxy-host <PROXY_HOST>\n\nUsage: x --proxy-host <PROXY_HOST>\n";
        assert_eq!(
            super::one_line(text),
            "the following required arguments were not provided: --proxy-host <PROXY_HOST>"
        );
    }
}
