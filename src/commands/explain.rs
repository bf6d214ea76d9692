//! `maskaudit explain CODE`: the long form of each finding code, from the registry
//! (`findings::Code`).

use crate::findings::Code;

pub fn explain(code: &str) -> anyhow::Result<String> {
    if code == "all" {
        let mut out = String::new();
        for c in Code::ALL {
            out.push_str(&format!("{:<28} {}\n", c.name(), c.description()));
        }
        return Ok(out);
    }
    let code: Code = code.parse().map_err(anyhow::Error::msg)?;
    Ok(format!(
        "{}: {}\n\n{}\n",
        code.name(),
        code.description(),
        code.explanation()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_has_a_long_form_named_after_it() {
        for &code in Code::ALL {
            let text = explain(code.name()).unwrap();
            assert!(text.starts_with(code.name()), "{text}");
            assert!(
                text.len() > code.description().len() + 100,
                "{code}: long form missing"
            );
        }
        assert!(explain("nope").is_err());
    }
}
