"""Judge stored open-ended video-QA answers (Video-ChatGPT protocol): `python scripts/judge.py [results/runs]`."""
from visiondrop.harness.judge import main

if __name__ == "__main__":
    main()
