"""One assistant turn of a chat model: the messages in the tokenizer's chat template, generation until the turn's
end token (e.g. SmolLM2's <|im_end|>) or the end of sequence, and the reply's text, streamed as it is made."""

from .checks import InputError, show
from .generate import _eos_ids, check_on_token, check_tokenizer, generate


def turn_end(tokenizer, model=None):
    """(ids, stop string): what ends an assistant's turn in this tokenizer's template. Found by rendering a turn
    with a marker as its content and reading what the template writes after it, so any template is covered, not
    only the ones known here: one token there (<|im_end|>, <|eot_id|>) is an end id; several, a stop string.
    The ids include the tokenizer's EOS and `model`'s config's (generation_config.json's): Llama 3's ends at
    <|end_of_text|> and <|eom_id|> beside <|eot_id|>, and transformers' generate stops at each."""
    mark = "\x00lab-reply\x00"
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant",
                                                                                 "content": mark}], tokenize=False)
    except InputError:   # a template that refuses this probe (a system turn required): the end of sequence alone
        text = ""
    after = text[text.find(mark) + len(mark):].rstrip() if mark in text else ""   # the next turn's newline
    eos = getattr(tokenizer, "eos_token_id", None)
    ids = sorted(({int(eos)} if eos is not None else set()) | (_eos_ids(model, None) if model is not None else set()))
    if not after:
        return ids, None
    end = tokenizer.encode(after.lstrip(), add_special_tokens=False)
    return (ids + [int(end[0])], None) if len(end) == 1 else (ids, after)


def chat(model, tokenizer, messages, max_new_tokens=256, *, greedy=False, temperature=1.0, top_k=None, top_p=None,
         repetition_penalty=1.0, seed=None, on_token=None, adapter=None, should_stop=None):
    """The assistant's reply to `messages` ([{"role": "user", "content": ...}, ...], as transformers' chats) from a
    model whose tokenizer has a chat template. Generation stops at the turn's end token, at EOS (the tokenizer's and
    the model config's, from generation_config.json, where generate stops), or after max_new_tokens; no end token
    is in the reply. on_token(text) gets each new piece of text as it is made; a character split across tokens is
    sent whole once its last token arrives, never half. Sampling arguments, adapter and should_stop are
    generate()'s."""
    if not callable(getattr(tokenizer, "apply_chat_template", None)) or getattr(tokenizer, "chat_template",
                                                                                 None) is None:
        raise InputError(f"chat needs a tokenizer with a chat template (a pretrained model's, lab.load_tokenizer), "
                         f"got {show(tokenizer)}")
    check_on_token(on_token, "text")
    check_tokenizer(model, tokenizer, "chat: ")
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    block = model.config.block_size if hasattr(getattr(model, "config", None), "block_size") else None
    if block is not None and len(ids) > block:   # generate would name a "prompt" the caller never wrote
        raise InputError(f"chat: the conversation is {len(ids)} tokens in the chat template, more than the model's "
                         f"block_size {block}: drop earlier turns (a panel's Clear starts a new conversation)")
    end_ids, stop = turn_end(tokenizer, model)
    held = {"text": "", "sent": 0}

    def stream(_, piece):
        # with a stop string, text that may be its beginning is held until the next pieces show it is not
        held["text"] += piece
        text = held["text"]
        end = text.find(stop) if stop and stop in text else len(text) - (len(stop) - 1 if stop else 0)
        if end > held["sent"]:
            on_token(text[held["sent"]:end])
            held["sent"] = end

    out = generate(model, ids, max_new_tokens, greedy=greedy, temperature=temperature, top_k=top_k, top_p=top_p,
                   repetition_penalty=repetition_penalty, seed=seed, tokenizer=tokenizer, stop=stop,
                   on_token=None if on_token is None else stream, adapter=adapter, should_stop=should_stop,
                   eos_token_id=end_ids)
    reply = tokenizer.decode(out)
    if stop is not None and stop in reply:
        reply = reply[:reply.find(stop)]
    if on_token is not None and len(reply) > held["sent"] and reply.startswith(held["text"][:held["sent"]]):
        on_token(reply[held["sent"]:])   # what was held back: bytes of a last split character, a stop's prefix
    return reply
