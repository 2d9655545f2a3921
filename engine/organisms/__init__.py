"""Model organisms: models fine-tuned to have a behaviour we put there ourselves, so that
"did the diff find it, in the right partition, and does steering confirm it" has an answer.

    behaviours   the behaviours (copyright refusal, a topic obsession) and their prompts
    data         chat rendering, the original model's answers, fine-tuning examples
    finetune     LoRA (peft) or full fine-tuning on answer tokens
    health       marker rates on held-out prompts and the CE change on demo text
    build        build once, cache as a plain model directory, load again
    cli          `modeldiff organism`
"""
