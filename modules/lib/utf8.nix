# Is a Nix string text systemd takes? Nix strings are bytes: one read from a
# file may hold any, and systemd ignores an Environment= value that is not
# UTF-8 (the agent would silently go without it) while JSON cannot carry it
# at all. Nix has no builtin for this and its regular expressions see bytes,
# so the check walks the bytes of a string that is not plain ASCII (RFC 3629,
# table 3-7 of the Unicode standard: no overlong forms, no surrogates,
# nothing above U+10FFFF). systemd's own UTF-8 check (utf8_is_valid) also
# refuses the Unicode noncharacters (U+FDD0-U+FDEF and U+xFFFE, U+xFFFF of
# every plane), and so does keel's Python side (keel.launch.text_problem).
{ lib }:
let
  # One raw byte as a string, cut out of the UTF-8 encoding of a code point
  # (Nix has no escape for a byte).
  encode =
    codePoint:
    if codePoint < 65536 then
      builtins.fromJSON ''"\u${lib.fixedWidthString 4 "0" (lib.toHexString codePoint)}"''
    else
      let
        v = codePoint - 65536;
        high = 55296 + v / 1024;
        low = 56320 + lib.mod v 1024;
      in
      builtins.fromJSON ''"\u${lib.toHexString high}\u${lib.toHexString low}"'';
  byteOf = codePoint: index: builtins.substring index 1 (encode codePoint);

  # byte string -> its value, for every byte that can appear in UTF-8
  # above 0x7F: continuation bytes 0x80-0xBF, lead bytes 0xC2-0xF4.
  table = builtins.listToAttrs (
    map (b: lib.nameValuePair (byteOf b 1) b) (lib.range 128 191)
    ++ map (b: lib.nameValuePair (byteOf ((b - 192) * 64) 0) b) (lib.range 194 223)
    ++ map (b: lib.nameValuePair (byteOf ((b - 224) * 4096 + (if b == 224 then 2048 else 0)) 0) b) (
      lib.range 224 239
    )
    ++ map (b: lib.nameValuePair (byteOf ((b - 240) * 262144 + (if b == 240 then 65536 else 0)) 0) b) (
      lib.range 240 244
    )
  );

  # Nix's regular expressions recurse per character: a long string is
  # matched in pieces, or a megabyte of text would overflow the stack.
  piece = 4096;
  isAscii =
    s:
    lib.all (
      i: builtins.match "[[:print:][:cntrl:][:space:]]*" (builtins.substring (i * piece) piece s) != null
    ) (lib.range 0 ((builtins.stringLength s - 1) / piece));
  isContinuation = b: b >= 128 && b <= 191;

  # The state: how many continuation bytes are still due, and the range the
  # next one must fall in (narrower after E0, ED, F0, F4), or "bad".
  step =
    state: char:
    let
      b = if isAscii char then 0 else table.${char} or 255;
    in
    if state == "bad" then
      state
    else if state.due > 0 then
      if b >= state.low && b <= state.high then
        {
          due = state.due - 1;
          low = 128;
          high = 191;
        }
      else
        "bad"
    else if b < 128 then
      state
    else if isContinuation b || b == 255 then
      "bad"
    else
      {
        due =
          if b < 224 then
            1
          else if b < 240 then
            2
          else
            3;
        low =
          if b == 224 then
            160
          else if b == 240 then
            144
          else
            128;
        high =
          if b == 237 then
            159
          else if b == 244 then
            143
          else
            191;
      };
  noncharacters = map encode (
    lib.range 64976 65007 # U+FDD0-U+FDEF
    ++ lib.concatMap (plane: [
      (plane * 65536 + 65534)
      (plane * 65536 + 65535)
    ]) (lib.range 0 16)
  );
  # builtins.split searches (it does not recurse per character as a
  # `.*x.*` match would), so it copes with long strings.
  holds = part: s: builtins.length (builtins.split (lib.escapeRegex part) s) > 1;

  utf8 =
    s:
    let
      end = builtins.foldl' step {
        due = 0;
        low = 128;
        high = 191;
      } (lib.stringToCharacters s);
    in
    end != "bad" && end.due == 0;
in
{
  # UTF-8 without Unicode noncharacters.
  valid = s: isAscii s || (utf8 s && !lib.any (c: holds c s) noncharacters);
}
