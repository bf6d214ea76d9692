//! Decoding token ids for the token view through a Hugging Face `tokenizer.json`.
//!
//! Each id's piece is what it adds to the decoded text (the `tokenizers` crate's
//! `DecodeStream`), so byte-level BPE spaces and multi-byte characters come out as text; a
//! piece that ends inside a character is empty, and its bytes appear with the next token.
//! Ids the tokenizer does not know show as `<?ID>`.

use std::path::Path;

use anyhow::{anyhow, Result};
use tokenizers::Tokenizer;

use crate::lint::view::TokenText;

pub struct HfTokenizer {
    tokenizer: Tokenizer,
}

impl HfTokenizer {
    pub fn load(path: &Path) -> Result<Self> {
        if !path.is_file() {
            return Err(anyhow!("{}: no such file", path.display()));
        }
        let tokenizer = Tokenizer::from_file(path)
            .map_err(|e| anyhow!("{}: not a tokenizer.json: {e}", path.display()))?;
        Ok(Self { tokenizer })
    }
}

impl TokenText for HfTokenizer {
    fn pieces(&self, ids: &[i64]) -> Vec<String> {
        let mut stream = self.tokenizer.decode_stream(false);
        ids.iter()
            .map(|&id| {
                let unknown = || format!("<?{id}>");
                let Ok(id) = u32::try_from(id) else {
                    return unknown();
                };
                if self.tokenizer.id_to_token(id).is_none() {
                    return unknown();
                }
                match stream.step(id) {
                    Ok(piece) => piece.unwrap_or_default(),
                    Err(_) => unknown(),
                }
            })
            .collect()
    }

    fn separator(&self) -> &str {
        ""
    }
}
