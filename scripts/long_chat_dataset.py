"""Writes a chat dataset whose conversations are long enough to fill --max_seq_length 2048 (and
to be truncated there), so that a fine-tune runs full 12 × 2048 batches, like `philo bench
train`. Random English words; the answers are long, so most tokens are labelled.

  python3 scripts/long_chat_dataset.py OUT.json [--examples 144] [--words 2600] [--seed 0]
"""
import argparse, json, random

WORDS = ("time year people way day man thing woman life child world school state family student "
         "group country problem hand part place case week company system program question work "
         "government number night point home water room mother area money story fact month lot "
         "right study book eye job word business issue side kind head house service friend father "
         "power hour game line end member law car city community name president team minute idea "
         "kid body information back parent face others level office door health person art war "
         "history party result change morning reason research girl guy moment air teacher force "
         "education good new first last long great little own other old right big high different "
         "small large next early young important few public bad same able make know take see come "
         "think look want give use find tell ask seem feel try leave call keep let begin help show "
         "hear play run move like live believe hold bring happen write provide sit stand lose pay "
         "meet include continue set learn lead understand watch follow stop create speak read").split()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--examples", type=int, default=144)
    ap.add_argument("--words", type=int, default=2600)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    rng = random.Random(a.seed)
    rows = []
    for i in range(a.examples):
        prompt = " ".join(rng.choice(WORDS) for _ in range(40))
        answer = " ".join(rng.choice(WORDS) for _ in range(a.words))
        rows.append({"messages": [{"role": "user", "content": f"Example {i}: {prompt}?"},
                                  {"role": "assistant", "content": answer.capitalize() + "."}]})
    with open(a.out, "w") as f:
        json.dump(rows, f)


if __name__ == "__main__":
    main()
