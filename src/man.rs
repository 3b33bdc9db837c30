//! The man pages' hand-written sections (EXAMPLES, FILES, EXIT STATUS,
//! SEE ALSO), added to the pages clap_mangen generates from the flags: the
//! flags document themselves, these sections do not come from them. Both
//! binaries' hidden `man DIR` commands call [`add_sections`] on their top
//! page; the packages ship the result.

use std::path::Path;

/// One section: its title and its text. Text is paragraphs separated by
/// blank lines; a paragraph whose lines start with two spaces is shown as
/// is (commands), any other is filled.
pub struct Section<'a> {
    pub title: &'a str,
    pub text: &'a str,
}

/// What each command's top page adds to clap's: EXAMPLES, FILES, EXIT
/// STATUS (from the help's "Exit codes:" text, its first line dropped)
/// and SEE ALSO.
pub struct Extra<'a> {
    pub examples: &'a str,
    pub files: &'a str,
    pub exit_codes: &'a str,
    pub see_also: &'a str,
}

/// Writes a command's man pages into `dir`: `generate` writes clap's (one
/// per command), then the top page `top` gets `extra`'s sections.
pub fn write(dir: &Path, top: &str, extra: &Extra, generate: impl FnOnce(&Path) -> std::io::Result<()>) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    generate(dir)?;
    add_extra(&dir.join(top), extra)
}

/// Appends `extra`'s sections to the roff page at `page`.
pub fn add_extra(page: &Path, extra: &Extra) -> std::io::Result<()> {
    let exit_status = extra.exit_codes.split_once('\n').map_or(extra.exit_codes, |(_, codes)| codes);
    add_sections(
        page,
        &[
            Section { title: "EXAMPLES", text: extra.examples },
            Section { title: "FILES", text: extra.files },
            Section { title: "EXIT STATUS", text: exit_status },
            Section { title: "SEE ALSO", text: extra.see_also },
        ],
    )
}

/// Appends `sections` to the roff page at `page`.
pub fn add_sections(page: &Path, sections: &[Section]) -> std::io::Result<()> {
    let mut roff = std::fs::read_to_string(page)?;
    for s in sections {
        roff.push_str(&render(s));
    }
    std::fs::write(page, roff)
}

fn render(s: &Section) -> String {
    let mut out = format!(".SH \"{}\"\n", s.title);
    for para in s.text.trim_matches('\n').split("\n\n") {
        let literal = para.lines().all(|l| l.starts_with("  "));
        out.push_str(if literal { ".PP\n.nf\n" } else { ".PP\n" });
        for line in para.lines() {
            out.push_str(&escape(if literal { line } else { line.trim() }));
            out.push('\n');
        }
        if literal {
            out.push_str(".fi\n");
        }
    }
    out
}

/// Text as roff reads it literally: backslashes doubled, a line that
/// would start with a control character (`.` or `'`) guarded, dashes kept
/// as the ASCII hyphen-minus that flags are typed with.
fn escape(line: &str) -> String {
    let body = line.replace('\\', "\\e").replace('-', "\\-");
    if body.starts_with(['.', '\'']) {
        format!("\\&{body}")
    } else {
        body
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_stay_as_typed_and_text_cannot_become_a_roff_request() {
        let s = Section { title: "EXAMPLES", text: "Deploy:\n\n  fleetsync sync --group web\n  .hidden \\ back\n\n.SH not a request" };
        let roff = render(&s);
        assert!(roff.starts_with(".SH \"EXAMPLES\"\n.PP\nDeploy:\n.PP\n.nf\n"), "{roff}");
        assert!(roff.contains("  fleetsync sync \\-\\-group web\n"), "{roff}");
        assert!(roff.contains("\n  .hidden \\e back\n"), "{roff}");
        assert!(roff.contains("\n\\&.SH not a request\n"), "{roff}");
    }
}
